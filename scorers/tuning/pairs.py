"""Preference pairs from scored samples, and the JSONL file they are kept in.

The paper's guides were tuned on pairs of a model's own answers, one preferred over the other.
Here the preference comes from the judge: of the K continuations of an opening, the best and the
worst make a pair when the judge tells them clearly apart. Pure functions and plain files, so a
run can be inspected, tested without a model, and reused without resampling.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    scores: tuple[float, ...] = ()
    """The judge's score of every sample of this prompt, for inspection."""

    @property
    def gap(self) -> float:
        return self.chosen_score - self.rejected_score


@dataclass(frozen=True)
class TrainPair:
    """A pair from a preference file, as train_dpo reads it: the prompt as text (rendered), the two responses."""

    prompt: str
    chosen: str
    rejected: str


def select_pair(prompt: str, texts: Sequence[str], scores: Sequence[float], min_gap: float) -> PreferencePair | None:
    """Best against worst, or None when the gap is under `min_gap` (or fewer than two texts).

    Best-vs-worst rather than every pair: one pair per prompt spreads the signal over many
    openings, and the extremes are the pairs the judge is surest about. Ties go to the earlier
    sample, so the choice is a function of the sampled order alone.
    """
    if len(texts) != len(scores):
        raise ValueError(f"{len(texts)} texts but {len(scores)} scores")
    usable = [(s, i) for i, (t, s) in enumerate(zip(texts, scores)) if t.strip()]
    if len(usable) < 2:
        return None
    best = max(usable, key=lambda si: (si[0], -si[1]))
    worst = min(usable, key=lambda si: (si[0], si[1]))
    if best[0] - worst[0] < min_gap or best[1] == worst[1]:
        return None
    return PreferencePair(prompt, texts[best[1]], texts[worst[1]], float(best[0]), float(worst[0]),
                          tuple(float(s) for s in scores))


def select_pairs(
    prompts: Sequence[str], samples: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], min_gap: float
) -> list[PreferencePair]:
    """One pair per prompt where the judge's gap allows, in prompt order."""
    if not len(prompts) == len(samples) == len(scores):
        raise ValueError("prompts, samples and scores must have the same length")
    pairs = (select_pair(p, t, s, min_gap) for p, t, s in zip(prompts, samples, scores))
    return [pair for pair in pairs if pair is not None]


def write_pairs(path: Path, pairs: Sequence[PreferencePair], meta: dict[str, Any]) -> None:
    """First line `{"meta": ...}` (what made the pairs), then one pair per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    with open(partial, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for pair in pairs:
            record = asdict(pair)
            record["scores"] = [round(s, 4) for s in pair.scores]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(path)  # an interrupted run never leaves a file that looks complete


def read_pairs(path: Path, meta: dict[str, Any] | None = None) -> list[PreferencePair] | None:
    """The pairs in `path`, or None when it is missing or was made with other settings than `meta`."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        return None
    head = json.loads(lines[0])
    if meta is not None and head.get("meta") != json.loads(json.dumps(meta)):
        return None
    pairs = []
    for line in lines[1:]:
        r = json.loads(line)
        pairs.append(PreferencePair(r["prompt"], r["chosen"], r["rejected"], float(r["chosen_score"]),
                                    float(r["rejected_score"]), tuple(r.get("scores", ()))))
    return pairs
