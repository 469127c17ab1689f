"""Presets load, and bad settings are refused with a message that names the field."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.cli import main
from proxy.config import (
    AppConfig,
    ConfigError,
    ScorerConfig,
    SearchConfig,
    ServerConfig,
    OpenAICompletionsConfig,
    search_with,
    upstream_api_key,
)
from proxy.presets import build_config, load_config, preset_names, presets_dir
from proxy.search import mode_name

PAPER = ["base", "bon4", "bon8", "bon16", "cbs-w2k2l30", "cbs-w4k4l30"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets(name: str) -> None:
    cfg = load_config(f"paper-{name}")
    assert cfg.upstream.model == "gpt-3.5-turbo-instruct"
    assert cfg.upstream.prompt_template == "Instruction: {instruction}\nOutput:"
    assert (cfg.search.temperature, cfg.search.top_p) == (0.7, 1.0)
    assert mode_name(cfg.search) == name
    if name != "base":
        assert cfg.scorer is not None
        assert cfg.scorer.tuned.path == "HuggingFaceH4/zephyr-7b-beta"
        assert cfg.scorer.untuned.path == "HuggingFaceH4/mistral-7b-sft-beta"
        assert cfg.scorer.tuned.system_prompt == "" and cfg.scorer.tuned.chat_template == "zephyr"


def test_all_presets_validate() -> None:
    assert {"zephyr-7b-beta", "tulu-2-dpo-7b", "starling-lm-7b-alpha"} <= set(preset_names("scorer"))
    assert set(PAPER) <= set(preset_names("search"))
    for part in ("scorer", "search", "upstream"):
        for name in preset_names(part):
            build_config({"upstream": "gpt-3.5-turbo-instruct", "scorer": "zephyr-7b-beta", part: name})
    assert {f"paper-{name}" for name in PAPER} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(name), AppConfig)
        assert load_config(Path(str(presets_dir().joinpath(f"{name}.yaml")))) == load_config(name)


@pytest.mark.parametrize(
    "search, field",
    [
        ({"w": 0}, "search.w"),
        ({"k": 0}, "search.k"),
        ({"l": 0}, "search.l"),
        ({"max_new_tokens": 0}, "search.max_new_tokens"),
        ({"temperature": -0.1}, "search.temperature"),
        ({"top_p": 1.5}, "search.top_p"),
        ({"beams": 2}, "search.beams"),
    ],
)
def test_impossible_values_name_the_field(search: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config({"upstream": "gpt-3.5-turbo-instruct", "scorer": "zephyr-7b-beta", "search": search})
    assert str(e.value).startswith(field + ":")


def test_unknown_keys_anywhere_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"upstream\.modle: unknown field"):
        build_config({"upstream": {"model": "m", "modle": "x"}})
    with pytest.raises(ConfigError, match=r"scorer\.tuned\.gguf: unknown field"):
        build_config({"upstream": "gpt-3.5-turbo-instruct",
                      "scorer": {"tuned": {"path": "a", "gguf": "x"}, "untuned": {"path": "b"}}})
    with pytest.raises(ConfigError, match=r"colour: unknown field"):
        build_config({"upstream": "gpt-3.5-turbo-instruct", "colour": "blue"})


def test_preset_refinement_and_unknown_preset() -> None:
    cfg = build_config({"upstream": {"preset": "gpt-3.5-turbo-instruct", "base_url": "http://127.0.0.1:9/v1"},
                        "search": "base"})
    assert cfg.upstream.base_url == "http://127.0.0.1:9/v1" and cfg.upstream.model == "gpt-3.5-turbo-instruct"
    with pytest.raises(ConfigError, match="unknown preset 'bon3'.*bon4"):
        build_config({"upstream": "gpt-3.5-turbo-instruct", "search": "bon3"})


async def test_guided_search_needs_a_scorer() -> None:
    from proxy.client import GuidedClient

    cfg = build_config({"upstream": "gpt-3.5-turbo-instruct", "search": "bon8"})
    with pytest.raises(ConfigError, match="search.bon8 needs a scorer"):
        async with GuidedClient(cfg):
            pass


def test_overrides_are_validated() -> None:
    base = SearchConfig(w=2, k=2, l=30)
    assert search_with(base, k=4).k == 4
    with pytest.raises(ConfigError, match=r"^search\.k:"):
        search_with(base, k=-1)
    assert load_config("paper-bon4", seed=3).search.seed == 3


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml \(presets, given by name: .*paper-bon4"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"no file and no preset named .paper-bon5. \(presets: .*paper-base, .*paper-bon4"):
        load_config("paper-bon5")
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cli_reports_bad_config_and_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstream: gpt-3.5-turbo-instruct\nscorer: zephyr-7b-beta\nsearch: {w: 0}\n")
    assert main(["generate", "--config", str(cfg), "hi"]) == 2
    assert "search.w:" in capsys.readouterr().err
    assert main(["generate", "--config", "paper-bon4", "--k", "0", "hi"]) == 2
    assert "search.k:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--config", "paper-bon4", "--w", "two", "hi"])
    assert e.value.code == 2


def test_torch_threads_must_be_positive(tiny_scorer_config: ScorerConfig) -> None:
    # setting it is the engine's job: tests/test_engine.py
    with pytest.raises(ValidationError, match="torch_threads"):
        ScorerConfig.model_validate({**tiny_scorer_config.model_dump(), "torch_threads": 0})


def test_presets_are_package_data_and_the_models_read_no_file(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import w2s_presets

    assert Path(str(presets_dir())) == Path(w2s_presets.__file__).parent
    # the pydantic models never look for presets: with none to be found they validate as before
    monkeypatch.setenv("W2S_CONFIG_DIR", str(tmp_path))
    assert preset_names("search") == [] and preset_names() == []
    assert AppConfig.model_validate({"upstream": {"model": "m"}}).server.modes is None
    assert ServerConfig.model_validate({"modes": {"b": {"k": 4}}}).modes == {"b": SearchConfig(k=4)}
    with pytest.raises(ConfigError, match=r"search: unknown preset 'bon4' \(known: none\)"):
        build_config({"upstream": {"model": "m"}, "search": "bon4"})
    # W2S_CONFIG_DIR: another folder of the same layout
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "mine.yaml").write_text("w: 2\nk: 3\nl: 9\n")
    (tmp_path / "mine.yaml").write_text("upstream: {model: m}\nsearch: mine\n")
    assert preset_names("search") == ["mine"] and preset_names() == ["mine"]
    assert mode_name(load_config("mine").search) == "cbs-w2k3l9"


@pytest.mark.parametrize("base_url, needs_key", [
    (None, True), ("https://api.together.xyz/v1", True), ("http://10.0.0.5:8000/v1", True),
    ("http://127.0.0.1:8000/v1", False), ("http://localhost:8000/v1", False), ("http://[::1]:8000/v1", False)])
def test_a_hosted_api_without_its_key_is_refused_before_any_request(
        base_url: str | None, needs_key: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("W2S_TEST_KEY", raising=False)
    cfg = OpenAICompletionsConfig(model="m", base_url=base_url, api_key_env="W2S_TEST_KEY")
    if needs_key:
        with pytest.raises(ConfigError, match="W2S_TEST_KEY"):
            upstream_api_key(cfg)
    else:
        assert upstream_api_key(cfg).get_secret_value() == "no-key"
    monkeypatch.setenv("W2S_TEST_KEY", "sk-test")
    assert upstream_api_key(cfg).get_secret_value() == "sk-test"
