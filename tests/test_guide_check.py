"""`w2s guide-check`: its numbers against hand computations, the length-bias breakdown, the judge's
correlations, the preference file's errors, and the command end to end on the tiny real models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from proxy.cli import main
from proxy.config import ConfigError, ScorerConfig
from proxy.guide_check import Z95, check_guide, pearson, wilson
from proxy.guide_check_command import resolve_scorer
from proxy.preferences import PreferenceFileError, PreferencePair, read_pairs
from tests.doubles import FnScorer


def _pairs(*rows: tuple[str, str, str]) -> list[PreferencePair]:
    return [PreferencePair(p, c, r, line=i + 1) for i, (p, c, r) in enumerate(rows)]


def _table(values: dict[str, float]) -> FnScorer:
    return FnScorer(lambda text, finished: values[text])


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_wilson_matches_a_hand_computation() -> None:
    # 8 of 10: p = 0.8, z² = 3.8415; centre (0.8 + 0.19207) / 1.38415 = 0.71672,
    # half 1.96 * sqrt(0.016 + 0.0096036) / 1.38415 = 0.22658
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94328, abs=1e-4)
    assert wilson(3, 5) == pytest.approx((0.23072, 0.88236), abs=1e-4)
    assert wilson(0, 4)[0] == 0.0 and wilson(4, 4)[1] == 1.0 and all(map(math.isnan, wilson(0, 0)))
    assert Z95 == pytest.approx(1.96, abs=1e-3)


async def test_accuracy_interval_and_margin_by_hand() -> None:
    scores = {"a": 3, "b": 1, "c": 2, "d": 2.5, "e": 1, "f": 0, "g": 0.5, "h": 0, "i": 4, "j": 4}
    scorer = _table(scores)
    pairs = _pairs(("p1", "a", "b"), ("p2", "c", "d"), ("p3", "e", "f"), ("p4", "g", "h"), ("p5", "i", "j"))
    check = await check_guide(scorer, pairs, batch=2)
    # margins +2, -0.5, +1, +0.5, 0 (a tie loses): 3 of 5 right
    assert (check.accuracy.successes, check.accuracy.n, check.ties) == (3, 5, 1)
    assert (check.accuracy.low, check.accuracy.high) == pytest.approx(wilson(3, 5))
    assert check.margin.mean == pytest.approx(0.6)
    assert check.margin.se == pytest.approx(math.sqrt((1.4**2 + 1.1**2 + 0.4**2 + 0.1**2 + 0.6**2) / 4 / 5))
    # one session per prompt, both responses in one call, counted as finished, every session closed
    assert [c.texts for c in scorer.calls] and all(c.finished == [True, True] for c in scorer.calls)
    assert sorted(map(tuple, (c.texts for c in scorer.calls))) == [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h"),
                                                                   ("i", "j")]
    assert sorted(scorer.prompts) == ["p1", "p2", "p3", "p4", "p5"] and scorer.open_sessions == 0


async def test_pairs_of_one_prompt_share_a_session_and_a_cluster() -> None:
    scorer = _table({"x": 2, "y": 1, "z": 0, "u": 0, "v": 1})
    check = await check_guide(scorer, _pairs(("q", "x", "y"), ("q", "x", "z"), ("r", "u", "v")))
    assert sorted(c.texts for c in scorer.calls) == [["u", "v"], ["x", "y", "z"]]
    assert (check.margin.clusters, check.margin.n) == (2, 3)
    # prompt q's pairs average to 1.5, prompt r's is -1: mean 0.25, se |1.5 - -1| / 2
    assert check.margin.mean == pytest.approx(0.25) and check.margin.se == pytest.approx(1.25)
    assert [s.line for s in check.scores] == [1, 2, 3] and [s.prompt for s in check.scores] == [0, 0, 1]


async def test_a_guide_that_scores_length_shows_it() -> None:
    scorer = FnScorer(lambda text, finished: float(len(text)))
    pairs = _pairs(("a", "long answer", "short"), ("bb", "tiny", "much longer"), ("ccc", "longest one", "mid"),
                   ("dddd", "x", "longer one"), ("eeeee", "same", "size"), ("ffffff", "a bit longer", "brief"))
    check = await check_guide(scorer, pairs)
    sides = {b.label: b for b in check.by_length_difference}
    assert list(sides) == ["chosen longer", "same length", "chosen shorter"]
    assert (sides["chosen longer"].accuracy.rate, sides["chosen longer"].accuracy.n) == (1.0, 3)
    assert (sides["chosen shorter"].accuracy.rate, sides["chosen shorter"].accuracy.n) == (0.0, 2)
    assert sides["same length"].accuracy.rate == 0.0 and check.ties == 1
    assert check.longer_chosen.rate == pytest.approx(0.5) and check.length_r == pytest.approx(1.0)
    # prompts of 1..6 characters: three bins of two, cut at the terciles
    assert [(b.label, b.accuracy.n) for b in check.by_prompt_length] == [
        ("prompt 1-2 chars", 2), ("prompt 3-4 chars", 2), ("prompt 5-6 chars", 2)]


async def test_judge_agreement_and_correlations_by_hand() -> None:
    guide = {"A": 2, "B": 0, "C": 0, "D": 1, "E": 3, "F": 0, "G": 1, "H": 0}
    judge = {"A": 1, "B": 0, "C": 0.5, "D": 0, "E": 0.2, "F": 0, "G": 0, "H": 0}
    pairs = _pairs(("p1", "A", "B"), ("p2", "C", "D"), ("p3", "E", "F"), ("p4", "G", "H"))
    check = await check_guide(_table(guide), pairs, judge.__getitem__, judge_name="lexicon")
    j = check.judge
    assert j is not None and j.name == "lexicon"
    # judge margins +1, +0.5, +0.2, 0: it prefers chosen in 3 of 4
    assert (j.judge_accuracy.successes, j.judge_accuracy.n) == (3, 4)
    # signs: p1 agree, p2 disagree (guide -1), p3 agree, p4 left out (the judge ties)
    assert (j.agreement.successes, j.agreement.n) == (2, 3)
    # each prompt's two responses correlate +1 or -1; p4's judge is constant: (1 - 1 + 1) / 3 = 2 * 2/3 - 1
    assert j.within_prompt_r == pytest.approx(1 / 3) and j.within_prompt_prompts == 3
    # Pearson of guide margins (2, -1, 3, 1) and judge margins (1, 0.5, 0.2, 0): means 1.25, 0.425
    assert j.margin_r == pytest.approx(-0.025 / math.sqrt(8.75 * 0.5675))
    assert pearson([1, 2, 3], [2, 4, 7]) > 0.98 and math.isnan(pearson([1, 1], [1, 2]))


def test_every_line_form_reads(tmp_path: Path) -> None:
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    path = _write(tmp_path / "p.jsonl", [
        {"meta": {"judge": "vader"}},
        {"prompt": "Say hi", "chosen": "hi", "rejected": "go away", "score_chosen": 9},
        "",
        {"prompt": "Say hi", "chosen": [turn("user", "Say hi"), turn("assistant", "hello")],
         "rejected": [turn("user", "Say hi"), turn("assistant", "no")], "prompt_id": "x"},
        {"prompt": [turn("system", "Be kind."), turn("user", "Say hi")], "chosen": [turn("assistant", "hey")],
         "rejected": [turn("assistant", "meh")]},
        {"prompt": "Say hi", "chosen": [turn("assistant", "hey")], "rejected": [turn("assistant", "meh")]},
    ])
    pairs = read_pairs(path)
    assert [p.line for p in pairs] == [2, 4, 5, 6]
    assert pairs[0].prompt == "Say hi" and (pairs[0].chosen, pairs[0].rejected) == ("hi", "go away")
    assert pairs[1].prompt == (turn("user", "Say hi"),) and pairs[1].chosen == "hello"
    assert pairs[2].prompt == (turn("system", "Be kind."), turn("user", "Say hi")) and pairs[2].rejected == "meh"
    assert pairs[3].prompt == "Say hi"
    assert [p.line for p in read_pairs(path, limit=2)] == [2, 4]


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "not JSON"),
    ('["prompt", "chosen"]', "expected a JSON object"),
    ({"prompt": "q", "chosen": "a"}, "missing field rejected"),
    ({"chosen": "a", "rejected": "b"}, "missing field prompt"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen: empty string"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt: empty string"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same text"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen: Input should be a valid string"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "not the assistant's response"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "no prompt"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "differ before their last turn"),
])
def test_a_bad_line_is_named(tmp_path: Path, bad: object, problem: str) -> None:
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, "", bad])
    with pytest.raises(PreferenceFileError) as e:
        read_pairs(path)
    assert f"{path} line 3: " in str(e.value) and problem in str(e.value)


def test_a_file_with_no_pairs_says_so(tmp_path: Path) -> None:
    with pytest.raises(PreferenceFileError, match="no preference pairs"):
        read_pairs(_write(tmp_path / "p.jsonl", ["", {"meta": {}}]))
    with pytest.raises(PreferenceFileError, match="cannot read"):
        read_pairs(tmp_path / "missing.jsonl")


def test_the_scorer_flag_resolves_presets_files_and_overrides(tmp_path: Path) -> None:
    cfg = resolve_scorer("zephyr-7b-beta", adapter="/adapters/a", expo_alpha=0.5)
    assert cfg.tuned.path == "HuggingFaceH4/zephyr-7b-beta" and cfg.tuned.adapter == "/adapters/a"
    assert cfg.expo_alpha == 0.5
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"tuned": {"path": "org/t"}, "untuned": {"path": "org/u"}}))
    assert resolve_scorer(str(bare)).untuned.path == "org/u"
    section = tmp_path / "section.yaml"
    section.write_text(yaml.safe_dump({"scorer": {"preset": "tulu-2-dpo-7b", "batch_size": 2}}))
    assert resolve_scorer(str(section)).batch_size == 2
    assert resolve_scorer("paper-cbs-w4k4l30").tuned.path  # a whole-config preset's scorer
    with pytest.raises(ConfigError, match="no file and no preset"):
        resolve_scorer("no-such-guide")
    with pytest.raises(ConfigError, match="unknown film-review guide"):
        resolve_scorer("film-review:sideways")


def test_the_command_end_to_end(tmp_path: Path, tiny_scorer_config: ScorerConfig,
                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "guide.yaml"
    config.write_text(yaml.safe_dump({"scorer": tiny_scorer_config.model_dump(mode="json", exclude_defaults=True)}))
    pairs = _write(tmp_path / "pairs.jsonl", [
        {"prompt": "Write a haiku about autumn.", "chosen": "Red leaves drift and fall.", "rejected": "No."},
        {"prompt": "Hello there!", "chosen": "Hi.", "rejected": "Hello! How are you today?"},
        {"prompt": "Name three fruits.", "chosen": "apples, oranges and pears", "rejected": "the sea"},
        {"prompt": [{"role": "user", "content": "Say something nice."}],
         "chosen": [{"role": "assistant", "content": "What a lovely day."}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
    ])
    out = tmp_path / "check.json"
    assert main(["guide-check", "--scorer", str(config), "--pairs", str(pairs), "--judge", "vader",
                 "--json", str(out), "--limit", "3", "-q"]) == 0
    printed = capsys.readouterr().out
    for part in ("guide check: 3 pairs (3 prompts)", "all pairs", "chosen longer", "chosen shorter",
                 "accuracy [95% CI]", "judge vader: prefers chosen", "within-prompt r", f"written to {out}"):
        assert part in printed, printed
    data = json.loads(out.read_text())
    assert data["pairs"] == 3 and data["judge"]["name"] == "vader" and data["accuracy"]["n"] == 3
    assert [s["line"] for s in data["scores"]] == [1, 2, 3]
    assert all(math.isfinite(s["chosen"]) and math.isfinite(s["margin"]) for s in data["scores"])
    assert data["scorer_config"]["tuned"]["path"] == tiny_scorer_config.tuned.path
    assert data["accuracy"]["successes"] == sum(s["margin"] > 0 for s in data["scores"])

    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    assert main(["guide-check", "--scorer", str(config), "--pairs", str(bad)]) == 2
    assert f"{bad} line 1: chosen and rejected are the same text" in capsys.readouterr().err
