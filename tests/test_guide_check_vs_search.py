"""benchmarks/guide_check_vs_search.py on tiny data: the pairs, best-of-N, the ranks; no model."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.guide_check_vs_search import (  # noqa: E402
    best_of, bon_gain, judged_pairs, ranks, rejudge, spearman, write_pairs,
)
from proxy.config import ModelSpec  # noqa: E402
from proxy.film_reviews.guides import plain_contrast_guide, reversed_guide, tuned_guide  # noqa: E402
from proxy.guide_check import PairScore, summarize  # noqa: E402
from proxy.preferences import read_pairs  # noqa: E402

JUDGE = {"great": 0.9, "fine": 0.2, "bad": -0.8, "meh": 0.0, "ok": 0.1}.get


def judge(text: str) -> float:
    return JUDGE(text.strip(), 0.0)  # type: ignore[misc]


def test_pairs_take_the_judges_extremes_and_skip_small_gaps(tmp_path: Path) -> None:
    samples = {(0, 0): [{"text": " fine"}, {"text": " great"}, {"text": " bad"}],
               (0, 1): [{"text": " meh"}, {"text": " ok"}],        # gap 0.1: skipped
               (1, 0): [{"text": " great"}, {"text": " great"}]}   # same text: skipped
    pairs = judged_pairs(samples, ["Opening A", "Opening B"], judge, 0.3)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("Opening A", " great", " bad")]
    write_pairs(tmp_path / "p.jsonl", pairs, {"labeller": "toy"})
    read = read_pairs(tmp_path / "p.jsonl")  # the meta line is skipped, the extra fields ignored
    assert [(p.prompt, p.chosen, p.rejected) for p in read] == [("Opening A", " great", " bad")]


def test_best_of_n_picks_the_first_highest_and_gains_against_sample_zero() -> None:
    assert best_of([0.1, 0.5, 0.5, 0.9], 3) == 1 and best_of([0.1, 0.5, 0.5, 0.9], 4) == 3
    samples = {(0, 0): [{"text": "bad"}, {"text": "great"}], (1, 0): [{"text": "fine"}, {"text": "bad"}]}
    gain = bon_gain(samples, {(0, 0): [0.0, 1.0], (1, 0): [2.0, 1.0]}, judge, n=2)
    assert gain.mean == pytest.approx((0.9 + 0.8 + 0.0) / 2) and gain.n == 2


def test_ranks_and_spearman() -> None:
    assert ranks({"a": 3.0, "b": 1.0, "c": 3.0}) == {"a": 1.5, "c": 1.5, "b": 3.0}
    assert spearman({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30}) == pytest.approx(1.0)
    assert spearman({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2}) == pytest.approx(-1.0)
    assert math.isnan(spearman({"a": 1}, {"a": 2}))


def test_rejudge_swaps_the_judge_of_a_check(tmp_path: Path) -> None:
    write_pairs(tmp_path / "p.jsonl", [{"prompt": "A", "chosen": "great", "rejected": "bad"},
                                       {"prompt": "B", "chosen": "fine", "rejected": "bad"}], {})
    pairs = read_pairs(tmp_path / "p.jsonl")
    scores = [PairScore(p.line, n, 1, len(p.chosen), len(p.rejected), s, 0.0) for n, (p, s)
              in enumerate(zip(pairs, (1.0, -1.0)))]
    check = rejudge(summarize(scores), pairs, lambda t: -judge(t), "upside-down")
    assert check.judge is not None and check.judge.name == "upside-down"
    assert check.judge.judge_accuracy.rate == 0.0 and check.judge.agreement.rate == 0.5


def test_the_extra_guides() -> None:
    smol = ModelSpec(path="/models/smol", gguf_file="smol.gguf", chat_template=None)
    plain = plain_contrast_guide(smol)
    assert plain.tuned.system_prompt.startswith("A very positive")  # type: ignore[union-attr]
    assert plain.untuned.system_prompt == "A film review:\n\n"
    t = tuned_guide(smol, "/adapters/dpo", batch_size=16)
    r = reversed_guide(t)
    assert (r.tuned, r.untuned, r.batch_size) == (t.untuned, t.tuned, 16)
