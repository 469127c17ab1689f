"""The `w2s` command's basics: --version, -v/-q/--log-format before or after the subcommand,
`w2s presets`, model paths (~ expanded, a missing local one named as such), the unreachable
upstream's URL in the error, library warnings kept out, and `w2s serve --log-format json`."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import build_parser, main, version
from proxy.config import ModelSpec
from proxy.config.scorer import ModelPathMissing, check_local_model
from proxy.logs import setup_logging
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.upstreams.errors import UpstreamError, public_url

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with warnings.catch_warnings():
        yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def parse(*argv: str) -> object:
    from proxy.cli import _merge_common
    return _merge_common(build_parser().parse_args(list(argv)))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"w2s {version()}" and version() != "unknown"


def test_verbosity_and_log_format_before_or_after_the_subcommand() -> None:
    assert parse("serve", "--config", "x").verbose == 0  # type: ignore[attr-defined]
    assert parse("-v", "serve", "--config", "x").verbose == 1  # type: ignore[attr-defined]
    assert parse("serve", "-v", "--config", "x").verbose == 1  # type: ignore[attr-defined]
    assert parse("-v", "serve", "--config", "x", "-vv").verbose == 3  # type: ignore[attr-defined]
    assert parse("serve", "--config", "x", "-q").verbose == -1  # type: ignore[attr-defined]
    assert parse("serve", "--config", "x", "--log-format", "json").log_format == "json"  # type: ignore[attr-defined]
    assert parse("--log-format", "json", "presets").log_format == "json"  # type: ignore[attr-defined]
    assert parse("alpaca-eval", "merge", "-v", "a", "b", "--output", "c").verbose == 1  # type: ignore[attr-defined]


def test_presets_lists_each_part_and_what_its_names_resolve_to(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "configs (--config NAME):" in out and "upstream presets" in out and "search presets" in out
    assert any(line.split()[:4] == ["gpt-3.5-turbo-instruct", "openai-completions", "model", "gpt-3.5-turbo-instruct"]
               for line in out.splitlines())
    assert any(line.split()[:3] == ["cbs-w4k4l30", "W", "4"] for line in out.splitlines())
    assert any(line.split()[:2] == ["zephyr-7b-beta", "implicit"] for line in out.splitlines())


def test_model_paths_expand_home_and_a_missing_local_one_is_named(tmp_path: Path) -> None:
    assert ModelSpec(path="~/models/tiny", adapter="~/a").path == os.path.expanduser("~/models/tiny")
    assert ModelSpec(path="~/models/tiny", adapter="~/a").adapter == os.path.expanduser("~/a")
    assert ModelSpec(path="org/name").path == "org/name"
    for hub_id in ("gpt2", "HuggingFaceH4/zephyr-7b-beta"):
        check_local_model(hub_id)  # the hub's to answer
    check_local_model(str(tmp_path))
    for local in (str(tmp_path / "absent"), "./absent-model", "../absent", "a/b/c"):
        with pytest.raises(ModelPathMissing, match="no such local directory"):
            check_local_model(local)


def test_serve_local_names_a_missing_local_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 restored_logging: None) -> None:
    missing = tmp_path / "no-model-here"
    assert main(["serve-local", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: no such local directory" in err and "Repo id" not in err and "Traceback" not in err


def test_public_url_drops_credentials_and_query() -> None:
    assert public_url("https://user:sk-secret@api.example.com:8443/v1/completions?key=sk-2#f") == \
        "https://api.example.com:8443/v1/completions"
    assert UpstreamError("connection").url is None


def test_an_unreachable_upstream_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          restored_logging: None) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"upstream: {{model: m, base_url: 'http://127.0.0.1:{dead}/v1', max_attempts: 1}}\n")
    assert main(["generate", "--config", str(cfg), "hello"]) == 1
    err = capsys.readouterr().err
    assert f"could not be reached (after retries) (http://127.0.0.1:{dead}/v1/completions)" in err
    assert "Traceback" not in err


def test_library_warnings_are_kept_out_and_ours_stay(restored_logging: None) -> None:
    setup_logging(0, "text")
    with warnings.catch_warnings(record=True) as seen:
        for module in ("torch.serialization", "transformers.modeling_utils", "huggingface_hub.file_download"):
            warnings.warn_explicit("deprecated", FutureWarning, "x.py", 1, module=module)
            warnings.warn_explicit("careful", UserWarning, "x.py", 2, module=module)
        warnings.warn_explicit("ours", FutureWarning, "y.py", 3, module="proxy.engine")
        warnings.warn_explicit("ours too", UserWarning, "y.py", 4, module="scorers.implicit")
    assert sorted(str(w.message) for w in seen) == ["ours", "ours too"]
    assert logging.getLogger("transformers").getEffectiveLevel() == logging.ERROR


def test_weight_loading_bars_are_kept_out(restored_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers draws "Loading weights" bars on stderr, into the server log; -vv keeps them."""
    from transformers.utils import logging as hf_logging
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    try:
        setup_logging(2, "text")
        assert hf_logging.is_progress_bar_enabled()
        setup_logging(0, "text")
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


async def test_serve_writes_json_log_lines_with_request_ids(tmp_path: Path, loopback: ToyCompletionsServer) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"upstream: {{model: toy-instruct, base_url: '{loopback.base_url}'}}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--port", "0", "-v", "--log-format", "json",
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("w2s: serving http://127.0.0.1:"), line
        base = line.split()[2]
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/completions", headers={"X-Request-Id": "json-1"},
                                 json={"model": "toy-instruct", "prompt": "hi", "max_tokens": 3}) as r:
                assert r.status == 200 and r.headers["X-Request-Id"] == "json-1"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    lines = [json.loads(x) for x in err.decode().splitlines() if x.strip()]
    assert lines and all(set(e) >= {"time", "level", "logger", "message", "request_id"} for e in lines)
    access = [e for e in lines if e["logger"] == "aiohttp.access"]
    assert [e["request_id"] for e in access] == ["json-1"] and "POST /v1/completions" in access[0]["message"]
