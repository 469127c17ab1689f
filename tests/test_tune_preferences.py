"""`w2s tune --preferences FILE`: DPO on a user's own preference file, on the tiny models.

The file plants a preference (chosen: plain words, rejected: symbols and digits) over 20 prompts;
the command trains, the loss falls, the adapter loads as the tuned side of a pair and tune.json
records the data, settings, seed, losses and the held-out check. A bad file, a chat file for a
model with no chat template and an interrupted run leave nothing at --output.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from proxy.config import ConfigError, ModelSpec, ScorerConfig
from proxy.film_reviews.tune_command import register, tune_command
from proxy.preferences import PreferenceFileError, read_pairs
from proxy.tune_preferences import atomic_output, split_by_prompt
from scorers.registry import load_scorer
from scorers.tuning import shipped_adapter_path
from scorers.tuning.from_file import ChatTemplateMissing
from tiny_models import TinyModelDirs

CHOSEN = [" the tuned model and its untuned parent agree", " the film was kind and the river agreed"]
REJECTED = [" numbers, symbols # @ % and 3.14159", " 42 # 17 @@ 9.81 %% 0x1f"]
PROMPTS = [f"Prompt {i}: tell me what you think of the film about the {w}, and"
           for i, w in enumerate("river fox owl king ship road tree moon bell lamp "
                                 "rain star wolf door cake coin rose salt wind iron".split())]
TINY = ("--steps", "8", "--batch-size", "4", "--learning-rate", "0.05", "--lora-r", "4", "--device", "cpu",
        "--threads", "2")


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_file(path: Path) -> Path:
    return _write(path, [{"prompt": p, "chosen": CHOSEN[i % 2], "rejected": REJECTED[i % 2], "id": i}
                         for i, p in enumerate(PROMPTS)])


def chat_file(path: Path) -> Path:
    return _write(path, [{"chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": CHOSEN[0]}],
                          "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": REJECTED[0]}]}
                         for p in PROMPTS[:8]])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["tune", *argv])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def tuned(tiny_model_dirs: TinyModelDirs, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("user")
    data, output = user_file(root / "prefs.jsonl"), root / "out" / "adapter"
    args = _args("--preferences", str(data), "--model", str(tiny_model_dirs.llama_untuned), "--output", str(output),
                 "--holdout-fraction", "0.2", "--seed", "3", *TINY)
    assert asyncio.run(tune_command(args)) == 0
    return data, output, json.loads((output / "tune.json").read_text())


async def test_loss_falls_and_the_record_is_complete(tuned, tiny_model_dirs: TinyModelDirs):
    data, output, record = tuned
    assert sorted(p.name for p in output.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "tune.json"]
    assert _leftovers(output.parent) == []  # the temporary directory was renamed, nothing beside it
    assert record["base_model"] == str(tiny_model_dirs.llama_untuned)
    d = record["data"]
    assert d["path"] == str(data.resolve()) and d["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert (d["pairs"], d["prompts"], d["chat_form"]) == (20, 20, 0)
    assert d["trained_on"] == {"pairs": 16, "prompts": 16} and d["held_out"] == {"pairs": 4, "prompts": 4}
    s = record["settings"]
    assert s["holdout_fraction"] == 0.2 and s["device"] == "cpu" and s["torch_threads"] == 2
    assert (s["train"]["steps"], s["train"]["batch_size"], s["train"]["lora_r"], s["train"]["seed"]) == (8, 4, 4, 3)
    assert record["seed"] == 3 and record["device"] == "cpu" and record["pairs_used"] == 16
    dpo = record["dpo"]
    assert dpo["steps"] == 8 and len(dpo["loss_curve"]) == 8
    assert dpo["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # LoRA starts as the identity
    assert dpo["loss_last"] < dpo["loss_first"] - 0.1
    check = record["heldout_check"]
    assert check["pairs"] == 4 and check["prompts"] == 4 and len(check["lines"]) == 4
    assert check["before"]["ties"] == 4 and check["before"]["accuracy"] == 0.0  # the parent against itself
    assert check["after"]["ties"] == 0 and check["after"]["accuracy"] >= 0.75  # the planted preference, unseen prompts
    held = {PROMPTS[line - 1] for line in check["lines"]}
    assert len(held) == 4  # lines name the held-out pairs of the file
    assert set(record["wall_s"]) >= {"load", "training", "check", "total"} and "trl" in record["versions"]


async def test_the_adapter_is_the_tuned_side_of_a_pair(tuned, tiny_model_dirs: TinyModelDirs):
    _, output, record = tuned
    parent = ModelSpec(path=str(tiny_model_dirs.llama_untuned), chat_template="raw", system_prompt=None)
    scorer = load_scorer(ScorerConfig(tuned=parent.model_copy(update={"adapter": str(output)}), untuned=parent,
                                      device="cpu", dtype="float32"))
    try:
        assert scorer.tuned.model is not scorer.untuned.model
        line = record["heldout_check"]["lines"][0]
        with scorer.open(PROMPTS[line - 1]) as session:
            chosen, rejected = await session.score([CHOSEN[(line - 1) % 2], REJECTED[(line - 1) % 2]], [True, True])
        assert chosen > rejected
    finally:
        await scorer.aclose()


async def test_chat_form_pairs_are_rendered_with_the_chat_template(tiny_model_dirs: TinyModelDirs, tmp_path: Path):
    from transformers import AutoTokenizer

    from scorers.tuning.from_file import render_prompt

    data, output = chat_file(tmp_path / "chat.jsonl"), tmp_path / "chat-adapter"
    args = _args("--preferences", str(data), "--model", str(tiny_model_dirs.llama_untuned), "--output", str(output),
                 "--holdout-fraction", "0.25", "--steps", "3", "--batch-size", "2", "--lora-r", "2", "--device", "cpu")
    assert await tune_command(args) == 0
    record = json.loads((output / "tune.json").read_text())
    assert record["data"]["chat_form"] == 8 and record["heldout_check"]["pairs"] == 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs.llama_untuned)
    rendered = render_prompt(tokenizer, [{"role": "user", "content": "hi"}], "tiny")
    assert rendered == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                     add_generation_prompt=True)
    assert rendered.startswith("<|user|>") or "hi" in rendered


async def test_chat_pairs_need_a_chat_template(tiny_model_dirs: TinyModelDirs, tmp_path: Path):
    model = shutil.copytree(tiny_model_dirs.llama_untuned, tmp_path / "no-template")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    output = tmp_path / "out"
    args = _args("--preferences", str(chat_file(tmp_path / "chat.jsonl")), "--model", str(model),
                 "--output", str(output), *TINY)
    with pytest.raises(ChatTemplateMissing, match="no chat template"):
        await tune_command(args)
    assert not output.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "p", "chosen": "a"}, "line 3: missing field rejected"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "line 3: chosen: empty string"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "line 3: chosen and rejected are the same text"),
    ({"text": "not a pair"}, "line 3: missing fields chosen, rejected"),
])
async def test_a_bad_file_is_refused_before_any_model_loads(row, problem, tmp_path: Path, monkeypatch):
    import scorers.loading

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(scorers.loading, "load_causal_lm", no_load)
    data = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "y"}, {"meta": {}}, row])
    output = tmp_path / "out"
    with pytest.raises(PreferenceFileError, match=problem):
        await tune_command(_args("--preferences", str(data), "--model", "unused", "--output", str(output)))
    assert not output.exists() and _leftovers(tmp_path) == []


async def test_a_failed_run_leaves_nothing_at_the_output(tiny_model_dirs: TinyModelDirs, tmp_path: Path, monkeypatch):
    import scorers.tuning.dpo

    def interrupted(*a: object, **k: object) -> None:
        raise RuntimeError("interrupted mid-training")

    monkeypatch.setattr(scorers.tuning.dpo, "train_dpo", interrupted)
    output = tmp_path / "out"
    args = _args("--preferences", str(user_file(tmp_path / "prefs.jsonl")), "--model",
                 str(tiny_model_dirs.llama_untuned), "--output", str(output), *TINY)
    with pytest.raises(RuntimeError, match="interrupted"):
        await tune_command(args)
    assert not output.exists() and _leftovers(tmp_path) == []


def test_an_interrupt_removes_the_partial_directory_and_keeps_an_earlier_output(tmp_path: Path):
    output = tmp_path / "adapter"
    with atomic_output(output) as work:
        (work / "tune.json").write_text("{}\n")
    assert (output / "tune.json").read_text() == "{}\n"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(output) as work:
            (work / "adapter_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in output.iterdir()) == ["tune.json"] and _leftovers(tmp_path) == []
    with atomic_output(output) as work:  # a complete run replaces an earlier output
        (work / "tune.json").write_text("{\"new\": 1}\n")
    assert json.loads((output / "tune.json").read_text()) == {"new": 1} and _leftovers(tmp_path) == []
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not an earlier"):
        with atomic_output(other):
            pass
    assert (other / "mine.txt").read_text() == "keep"


def test_split_by_prompt_is_deterministic_and_keeps_prompts_whole(tmp_path: Path):
    rows = [{"prompt": f"p{i % 10}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(30)]
    pairs = read_pairs(_write(tmp_path / "p.jsonl", rows))
    train, held = split_by_prompt(pairs, 0.2, seed=0)
    assert (len(train), len(held)) == (24, 6)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert split_by_prompt(pairs, 0.2, seed=0) == (train, held)
    assert {p.prompt for p in split_by_prompt(pairs, 0.2, seed=1)[1]} != {p.prompt for p in held}
    assert split_by_prompt(pairs, 0.0, seed=0) == (pairs, [])
    assert len(split_by_prompt(pairs[:2], 0.9, seed=0)[0]) == 1  # never all held out
    with pytest.raises(ConfigError):
        split_by_prompt(pairs, 1.0, seed=0)


async def test_recipe_flags_and_preference_flags_do_not_mix(tmp_path: Path):
    data = user_file(tmp_path / "prefs.jsonl")
    for extra in (("--judge", "textblob"), ("--pairs-file", "x.jsonl"), ("--holdout", "3")):
        with pytest.raises(ConfigError, match="do not apply"):
            await tune_command(_args("--preferences", str(data), "--output", str(tmp_path / "o"), *extra))
    with pytest.raises(ConfigError, match="go with --preferences"):
        await tune_command(_args("--output", str(tmp_path / "o"), "--holdout-fraction", "0.3"))
    assert not (tmp_path / "o").exists()


def test_the_film_review_pairs_file_is_a_preference_file():
    path = shipped_adapter_path()
    record = json.loads((path / "tune.json").read_text())
    pairs = read_pairs(path / "pairs.jsonl")  # its {"meta"} line and score fields are skipped
    assert len(pairs) == record["pairs"]["count"] and all(isinstance(p.prompt, str) for p in pairs)


async def test_the_recipe_writes_its_output_whole_and_reuses_its_pairs(tiny_model_dirs: TinyModelDirs, tmp_path: Path,
                                                                       monkeypatch):
    from proxy.film_reviews.judges import JUDGES

    monkeypatch.setitem(JUDGES, "vader", lambda text: float(text.count("e")))  # a wide spread on random text
    output = tmp_path / "recipe"
    argv = ("--model", str(tiny_model_dirs.llama_untuned), "--output", str(output), "--prompts", "6", "--holdout", "2",
            "--samples", "4", "--max-new-tokens", "8", "--min-gap", "1", "--steps", "1", "--batch-size", "2",
            "--lora-r", "2", "--no-check")
    assert await tune_command(_args(*argv)) == 0
    first = json.loads((output / "tune.json").read_text())
    assert not first["pairs"]["reused_file"] and first["pairs"]["count"] > 0
    assert {"pairs.jsonl", "tune.json", "adapter_model.safetensors"} <= {p.name for p in output.iterdir()}
    assert await tune_command(_args(*argv)) == 0  # the earlier pairs are carried into the new output
    again = json.loads((output / "tune.json").read_text())
    assert again["pairs"]["reused_file"] and again["pairs"]["count"] == first["pairs"]["count"]
    assert len(read_pairs(output / "pairs.jsonl")) == first["pairs"]["count"]  # a preference file
    assert _leftovers(tmp_path) == []


async def test_guide_check_finds_the_planted_preference_and_its_reverse(tuned, tiny_model_dirs: TinyModelDirs):
    """`w2s guide-check`'s arithmetic on the tuned pair, over the whole file (the held-out lines
    included): the planted preference is found nearly always, and the same pair reversed nearly never."""
    from proxy.film_reviews.guides import reversed_guide
    from proxy.guide_check import check_guide
    from proxy.preferences import read_pairs

    data, output, _ = tuned
    parent = ModelSpec(path=str(tiny_model_dirs.llama_untuned), chat_template="raw", system_prompt=None)
    cfg = ScorerConfig(tuned=parent.model_copy(update={"adapter": str(output)}), untuned=parent, device="cpu",
                       dtype="float32")
    pairs = read_pairs(data)
    for config, lowest, highest in ((cfg, 0.8, 1.0), (reversed_guide(cfg), 0.0, 0.2)):
        scorer = load_scorer(config)
        try:
            result = await check_guide(scorer, pairs)
        finally:
            await scorer.aclose()
        assert lowest <= result.accuracy.rate <= highest, result.accuracy
