"""`w2s tune`: pairs from judged samples, DPO with TRL on a tiny model, the adapter as a guide's
tuned side (merged at load through ModelSpec.adapter), and the command line."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from proxy.config import ModelSpec, ScorerConfig
from scorers.implicit import ImplicitRewardScorer
from scorers.loading import load_causal_lm
from scorers.tuning import shipped_adapter_path
from scorers.tuning.check import agreement, pearson, ranks, spearman
from proxy.film_reviews.tune_command import register, settings_from_args
from scorers.tuning.pairs import PreferencePair, read_pairs, select_pair, select_pairs, write_pairs
from scorers.tuning.settings import SamplingSettings, TrainSettings, TuneSettings
from tiny_models import TinyModelDirs

CPU = torch.device("cpu")

# Chosen and rejected differ in every token, so a few steps of DPO can tell them apart.
PAIRS = [
    PreferencePair(prompt, " the tuned model and its untuned parent agree", " numbers, symbols # @ % and 3.14159", 0.9, -0.8)
    for prompt in ("The new film opens on a quiet street, and", "I watched the sequel last night, and",
                   "The first thing you notice about the musical is", "After months of buzz, the epic is")
]


# ---- pairs ---------------------------------------------------------------------------------


def test_select_pair_takes_best_and_worst():
    pair = select_pair("p", ["a", "b", "c", "d"], [0.1, 0.9, -0.7, 0.2], min_gap=0.5)
    assert pair is not None
    assert (pair.chosen, pair.rejected) == ("b", "c")
    assert (pair.chosen_score, pair.rejected_score) == (0.9, -0.7)
    assert pair.gap == pytest.approx(1.6)
    assert pair.scores == (0.1, 0.9, -0.7, 0.2)


def test_select_pair_drops_small_gaps_empty_texts_and_ties():
    assert select_pair("p", ["a", "b"], [0.3, 0.1], min_gap=0.5) is None
    assert select_pair("p", ["a", "  ", "c"], [0.0, 1.0, 0.2], min_gap=0.5) is None  # the best one is empty
    assert select_pair("p", ["a"], [1.0], min_gap=0.0) is None
    assert select_pair("p", ["a", "b"], [0.5, 0.5], min_gap=0.0) is None  # nothing to prefer
    tie = select_pair("p", ["a", "b", "c"], [1.0, 1.0, 0.0], min_gap=0.5)
    assert tie is not None and tie.chosen == "a"  # ties go to the earlier sample
    with pytest.raises(ValueError):
        select_pair("p", ["a", "b"], [1.0], min_gap=0.0)


def test_select_pairs_keeps_prompt_order():
    pairs = select_pairs(["p1", "p2", "p3"], [["a", "b"], ["c", "d"], ["e", "f"]],
                         [[0.0, 1.0], [0.2, 0.3], [-1.0, 0.0]], min_gap=0.5)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p1", "b", "a"), ("p3", "f", "e")]


def test_pairs_file_round_trip_and_settings_match(tmp_path: Path):
    path = tmp_path / "pairs.jsonl"
    meta = SamplingSettings().key("model-x")
    pairs = [PreferencePair("p", " good ✓", " bad", 0.5, -0.5, (0.5, 0.1, -0.5))]
    write_pairs(path, pairs, meta)
    assert read_pairs(path, meta) == pairs
    assert read_pairs(path) == pairs  # no settings to match: read as is
    assert read_pairs(path, SamplingSettings(seed=1).key("model-x")) is None  # made otherwise: resample
    assert read_pairs(path, SamplingSettings().key("model-y")) is None
    assert read_pairs(tmp_path / "missing.jsonl", meta) is None
    assert json.loads(path.read_text().splitlines()[1])["chosen"] == " good ✓"


# ---- correlations ----------------------------------------------------------------------------


def test_correlations():
    assert list(ranks([3.0, 1.0, 3.0, 2.0])) == [2.5, 0.0, 2.5, 1.0]
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 1, 1]) == 0.0
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    got = agreement([[1.0, 2.0], [0.0, 3.0]], {"j": [[0.1, 0.2], [0.3, 0.0]]})
    assert got["j"]["spearman_within_opening"] == pytest.approx(0.0)  # +1 in one opening, -1 in the other


# ---- DPO on a tiny model, and the adapter as a guide ---------------------------------------------


TINY_TRAIN = TrainSettings(steps=8, batch_size=4, learning_rate=5e-2, beta=0.1, warmup_ratio=0.0, lora_r=4,
                           lora_alpha=8, max_length=64, seed=0)


@pytest.fixture(scope="module")
def trained(tiny_model_dirs: TinyModelDirs, tmp_path_factory: pytest.TempPathFactory):
    from scorers.tuning.dpo import save_adapter, train_dpo

    model, tokenizer = load_causal_lm(ModelSpec(path=str(tiny_model_dirs.llama_untuned)), CPU, torch.float32)
    peft_model, report = train_dpo(model, tokenizer, PAIRS, TINY_TRAIN)
    adapter = tmp_path_factory.mktemp("adapter")
    save_adapter(peft_model, adapter, base_model="tiny-llama")
    return adapter, report


def test_dpo_loss_falls(trained):
    _, report = trained
    assert report.steps == TINY_TRAIN.steps and report.pairs == len(PAIRS)
    assert len(report.losses) == TINY_TRAIN.steps
    assert report.losses[0] == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts as the identity
    assert report.losses[-1] < report.losses[0] - 0.1


def test_only_the_adapter_is_saved(trained):
    adapter, _ = trained
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["r"] == TINY_TRAIN.lora_r


def _raw(path: Path, **fields: object) -> ModelSpec:
    """A side as the film-review task configures it: raw text, no system turn."""
    return ModelSpec(path=str(path), chat_template="raw", system_prompt=None, **fields)  # type: ignore[arg-type]


def _config(tuned: ModelSpec, untuned: ModelSpec, **fields: object) -> ScorerConfig:
    return ScorerConfig(tuned=tuned, untuned=untuned, device="cpu", dtype="float32",
                        attn_implementation="eager", **fields)  # type: ignore[arg-type]


async def test_adapter_is_the_tuned_side_of_a_pair(trained, tiny_model_dirs: TinyModelDirs):
    adapter, _ = trained
    parent_dir = tiny_model_dirs.llama_untuned
    scorer = ImplicitRewardScorer.from_config(_config(_raw(parent_dir, adapter=str(adapter)), _raw(parent_dir)))
    parent, _ = load_causal_lm(ModelSpec(path=str(parent_dir)), CPU, torch.float32)
    try:
        tuned, untuned = scorer.tuned.model, scorer.untuned.model
        assert tuned is not untuned  # base and base+adapter are different weights
        reference = parent.state_dict()
        assert all(torch.equal(p, reference[name]) for name, p in untuned.state_dict().items())
        changed = {name for name, p in tuned.state_dict().items() if not torch.equal(p, reference[name])}
        assert changed and all("q_proj" in n or "v_proj" in n for n in changed)
        assert tuned.state_dict().keys() == reference.keys()  # merged: a plain model again, no LoRA layers
        pair = PAIRS[0]
        with scorer.open(pair.prompt) as session:
            chosen, rejected = await session.score([pair.chosen, pair.rejected], [False, False])
        assert chosen > 0 > rejected  # the guide prefers what DPO was shown as preferred
    finally:
        await scorer.aclose()


async def test_same_path_with_and_without_adapter_are_not_a_prompt_contrast_pair(trained, tiny_model_dirs):
    adapter, _ = trained
    both = _raw(tiny_model_dirs.llama_untuned, adapter=str(adapter))
    contrast = ImplicitRewardScorer.from_config(_config(both, both.model_copy(update={"system_prompt": "Be kind."})))
    try:
        assert contrast.tuned.model is contrast.untuned.model  # same weights, adapter included: shared
    finally:
        await contrast.aclose()


async def test_expo_extrapolates_along_the_adapter(trained, tiny_model_dirs: TinyModelDirs):
    adapter, _ = trained
    parent_dir = tiny_model_dirs.llama_untuned
    tuned_spec = _raw(parent_dir, adapter=str(adapter))
    merged, _ = load_causal_lm(tuned_spec, CPU, torch.float32)
    parent, _ = load_causal_lm(_raw(parent_dir), CPU, torch.float32)
    scorer = ImplicitRewardScorer.from_config(_config(tuned_spec, _raw(parent_dir), expo_alpha=0.5))
    try:
        got, m, p = scorer.tuned.model.state_dict(), merged.state_dict(), parent.state_dict()
        for name in got:
            torch.testing.assert_close(got[name], m[name] + 0.5 * (m[name] - p[name]), rtol=0, atol=1e-6)
    finally:
        await scorer.aclose()


def test_a_bad_adapter_is_named(tiny_model_dirs: TinyModelDirs, tmp_path: Path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(ValueError, match="no-such-adapter"):
        load_causal_lm(ModelSpec(path=str(tiny_model_dirs.llama_untuned), adapter=str(missing)), CPU, torch.float32)


def test_whole_run_on_a_tiny_model_reuses_its_pairs(tiny_model_dirs: TinyModelDirs, tmp_path: Path):
    from scorers.tuning.run import run_tune

    def letters_e(text: str) -> float:  # a stand-in judge with a wide spread on random text
        return float(text.count("e"))

    settings = TuneSettings(
        sampling=SamplingSettings(prompts=6, holdout=2, samples_per_prompt=4, max_new_tokens=12, min_gap=1.0,
                                  judge="letters-e", batch_size=16),
        train=TrainSettings(steps=2, batch_size=2, lora_r=2, lora_alpha=4, max_length=64),
        torch_threads=None,
    )
    openings = [f"Review number {i} of the film says that" for i in range(8)]
    spec = ModelSpec(path=str(tiny_model_dirs.llama_untuned))
    kwargs = dict(model_label="tiny", judge=letters_e, openings=openings, check_judges={"e": letters_e})
    first = run_tune(spec, tmp_path, settings, **kwargs)  # type: ignore[arg-type]
    assert first["pairs"]["count"] > 0 and not first["pairs"]["reused_file"]
    assert first["openings"] == {"trained_on": 6, "held_out": 2}
    assert first["dpo"]["steps"] == 2 and len(first["dpo"]["loss_curve"]) == 2
    assert first["heldout_check"]["openings"] == 2
    assert json.loads((tmp_path / "tune.json").read_text())["seed"] == 0
    assert (tmp_path / "adapter_model.safetensors").is_file()
    prompts = {p.prompt for p in read_pairs(tmp_path / "pairs.jsonl") or []}
    assert prompts <= set(openings[:6])  # never the held-out tail
    again = run_tune(spec, tmp_path, settings, **kwargs)  # type: ignore[arg-type]
    assert again["pairs"]["reused_file"] and again["pairs"]["count"] == first["pairs"]["count"]


# ---- the shipped adapter ------------------------------------------------------------------------


def test_shipped_adapter_is_small_and_made_by_the_defaults():
    path = shipped_adapter_path()
    assert (path / "adapter_model.safetensors").stat().st_size < 5_000_000
    record = json.loads((path / "tune.json").read_text())
    assert record["settings"] == json.loads(json.dumps(TuneSettings().as_dict()))  # `w2s tune` as shipped
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == record["settings"]["train"]["lora_r"]
    assert set(config["target_modules"]) == set(record["settings"]["train"]["target_modules"])
    assert record["dpo"]["loss_mean_last_tenth"] < record["dpo"]["loss_mean_first_tenth"]  # single steps are noisy
    pairs = read_pairs(path / "pairs.jsonl", SamplingSettings().key(record["base_model"]))
    assert pairs is not None and len(pairs) == record["pairs"]["count"]  # a rerun would reuse them
    with pytest.raises(FileNotFoundError, match="no-such"):
        shipped_adapter_path("no-such")


# ---- the command line ------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["tune", *argv])


def test_command_defaults_are_the_shipped_settings():
    args = _parse("--output", "out")
    assert args.output == Path("out") and args.model is None and args.gguf_file is None
    assert settings_from_args(args) == TuneSettings()


def test_command_flags_reach_the_settings():
    args = _parse("--model", "m", "--gguf-file", "f.gguf", "--output", "o", "--pairs", "40", "--steps", "3",
                  "--seed", "7", "--judge", "textblob", "--samples", "6", "--beta", "0.2", "--lora-r", "4")
    s = settings_from_args(args)
    assert (args.model, args.gguf_file) == ("m", "f.gguf")
    assert (s.train.max_pairs, s.train.steps, s.train.seed, s.train.beta) == (40, 3, 7, 0.2)
    assert (s.train.lora_r, s.train.lora_alpha) == (4, 8)
    assert (s.sampling.seed, s.sampling.judge, s.sampling.samples_per_prompt) == (7, "textblob", 6)
    with pytest.raises(SystemExit):
        _parse("--output", "o", "--judge", "gpt-4")
    with pytest.raises(SystemExit):
        _parse("--steps", "3")  # --output is required
