"""Does a guide prefer the answers people preferred? Its score on held-out preference pairs.

`check_guide` scores each pair's `chosen` and `rejected` through the scorer's sessions, the path a
search takes (`scorer.open(prompt)`, then `session.score(texts, finished)`), with the responses
counted as finished (they are whole answers: the end-of-text token is scored too). The pairs of
one prompt share a session; up to `batch` sessions score at once, so the scorer batches their
forward passes as it batches a search's beams.

What comes back (GuideCheck):
- accuracy: the share of pairs where the guide scores `chosen` strictly above `rejected` (ties are
  counted and lose), with a Wilson 95% interval;
- margin: score(chosen) - score(rejected), its mean and standard error clustered by prompt;
- the accuracy by prompt length (characters of the prompt, message contents summed, in three bins
  of about equal count) and by response-length difference (chosen longer, same length, shorter,
  in characters): a guide that merely prefers longer answers is right where chosen is longer and
  wrong where it is shorter; `longer_chosen` is the share of pairs such a guide would get right,
  `length_r` the Pearson correlation of the margin with len(chosen) - len(rejected);
- given a judge (text -> float, scoring the response alone): `judge_accuracy` (the judge agrees
  with the file's labels), `agreement` (the guide's margin and the judge's have the same sign,
  over pairs where neither is zero; with two responses to a prompt this is their within-prompt
  correlation, which can only be +1 or -1), `within_prompt_r` (the mean over prompts of the
  Pearson correlation of guide and judge scores across that prompt's distinct responses: equal to
  2 * agreement - 1 when each prompt has one pair) and `margin_r` (Pearson's r of the guide margin
  and the judge margin across pairs: how far the size of one tracks the size of the other).
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.film_reviews.stats import Estimate, estimate
from proxy.preferences import PreferencePair, Prompt
from scorers.base import Scorer, ScorerContextError

Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile: a two-sided 95% interval."""


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),
    p = successes / n; (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson's r; nan with fewer than two values or a constant side."""
    n = len(a)
    if n != len(b):
        raise ValueError(f"{n} vs {len(b)} values")
    if n < 2:
        return math.nan
    ma, mb = math.fsum(a) / n, math.fsum(b) / n
    sab = math.fsum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa, sbb = math.fsum((x - ma) ** 2 for x in a), math.fsum((y - mb) ** 2 for y in b)
    return sab / math.sqrt(saa * sbb) if saa > 0 and sbb > 0 else math.nan


@dataclass(frozen=True)
class Rate:
    """successes out of n, their share and its Wilson 95% interval."""

    successes: int
    n: int
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, successes: int, n: int) -> "Rate":
        return cls(successes, n, successes / n if n else math.nan, *wilson(successes, n))


@dataclass(frozen=True)
class Bin:
    """One slice of the pairs: its label, accuracy and mean margin."""

    label: str
    accuracy: Rate
    mean_margin: float


@dataclass(frozen=True)
class PairScore:
    line: int
    prompt: int
    """The prompt's number, in order of first appearance: pairs of one prompt share it."""
    prompt_chars: int
    chosen_chars: int
    rejected_chars: int
    chosen: float
    rejected: float
    judge_chosen: float | None = None
    judge_rejected: float | None = None

    @property
    def margin(self) -> float:
        return self.chosen - self.rejected


@dataclass(frozen=True)
class JudgeCheck:
    name: str
    judge_accuracy: Rate
    agreement: Rate
    within_prompt_r: float
    within_prompt_prompts: int
    margin_r: float


@dataclass(frozen=True)
class GuideCheck:
    pairs: int
    skipped: int
    """Pairs whose prompt does not fit the guide's context (not scored)."""
    ties: int
    accuracy: Rate
    margin: Estimate
    by_prompt_length: list[Bin]
    by_length_difference: list[Bin]
    longer_chosen: Rate
    length_r: float
    judge: JudgeCheck | None
    scores: list[PairScore]


def prompt_key(prompt: Prompt) -> object:
    return prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)


def prompt_chars(prompt: Prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def _bin(label: str, scores: Sequence[PairScore]) -> Bin:
    wins = sum(s.margin > 0 for s in scores)
    return Bin(label, Rate.of(wins, len(scores)), math.fsum(s.margin for s in scores) / len(scores))


def by_prompt_length(scores: Sequence[PairScore], bins: int = 3) -> list[Bin]:
    """Up to `bins` bins of prompt length in characters, cut at its quantiles (ties stay together,
    so fewer bins when lengths repeat); each labelled by the range of lengths it holds."""
    lengths = sorted(s.prompt_chars for s in scores)
    cuts = sorted({lengths[len(lengths) * i // bins] for i in range(1, bins)} - {lengths[0]})
    groups: list[list[PairScore]] = [[] for _ in range(len(cuts) + 1)]
    for s in scores:
        groups[sum(s.prompt_chars >= c for c in cuts)].append(s)
    out = []
    for group in groups:
        if group:
            lo, hi = min(s.prompt_chars for s in group), max(s.prompt_chars for s in group)
            out.append(_bin(f"prompt {lo}-{hi} chars" if lo != hi else f"prompt {lo} chars", group))
    return out


def by_length_difference(scores: Sequence[PairScore]) -> list[Bin]:
    """Chosen longer, the same length, chosen shorter than rejected (characters); empty ones left out."""
    sides = {"chosen longer": [s for s in scores if s.chosen_chars > s.rejected_chars],
             "same length": [s for s in scores if s.chosen_chars == s.rejected_chars],
             "chosen shorter": [s for s in scores if s.chosen_chars < s.rejected_chars]}
    return [_bin(label, group) for label, group in sides.items() if group]


def _judge_check(name: str, scores: Sequence[PairScore], groups: Sequence[Sequence[tuple[float, float]]]
                 ) -> JudgeCheck:
    judged = [(s.margin, s.judge_chosen - s.judge_rejected) for s in scores  # type: ignore[operator]
              if s.judge_chosen is not None and s.judge_rejected is not None]
    decided = [(g, j) for g, j in judged if g != 0 and j != 0]
    within = [pearson([g for g, _ in responses], [j for _, j in responses]) for responses in groups]
    within = [r for r in within if not math.isnan(r)]
    return JudgeCheck(
        name=name,
        judge_accuracy=Rate.of(sum(j > 0 for _, j in judged), len(judged)),
        agreement=Rate.of(sum((g > 0) == (j > 0) for g, j in decided), len(decided)),
        within_prompt_r=math.fsum(within) / len(within) if within else math.nan,
        within_prompt_prompts=len(within),
        margin_r=pearson([g for g, _ in judged], [j for _, j in judged]),
    )


def summarize(scores: list[PairScore], skipped: int = 0, judge_name: str | None = None,
              groups: Sequence[Sequence[tuple[float, float]]] = ()) -> GuideCheck:
    """The numbers of a GuideCheck from per-pair scores; `groups` holds, per prompt, the (guide,
    judge) scores of its distinct responses, for the within-prompt correlation."""
    if not scores:
        raise ValueError("no pair was scored")
    margins = {(s.prompt, i): s.margin for i, s in enumerate(scores)}
    return GuideCheck(
        pairs=len(scores),
        skipped=skipped,
        ties=sum(s.margin == 0 for s in scores),
        accuracy=Rate.of(sum(s.margin > 0 for s in scores), len(scores)),
        margin=estimate(margins),  # clustered by the key's first element: the prompt
        by_prompt_length=by_prompt_length(scores),
        by_length_difference=by_length_difference(scores),
        longer_chosen=Rate.of(sum(s.chosen_chars > s.rejected_chars for s in scores), len(scores)),
        length_r=pearson([s.margin for s in scores], [s.chosen_chars - s.rejected_chars for s in scores]),
        judge=None if judge_name is None else _judge_check(judge_name, scores, groups),
        scores=scores,
    )


async def check_guide(scorer: Scorer, pairs: Sequence[PreferencePair], judge: Callable[[str], float] | None = None,
                      *, judge_name: str = "judge", batch: int = 16,
                      progress: Callable[[int], None] | None = None) -> GuideCheck:
    """Score every pair (see the module's doc) and summarize. `progress(n)` is called as each
    prompt's `n` pairs are done."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    by_prompt: dict[object, list[PreferencePair]] = {}
    for pair in pairs:
        by_prompt.setdefault(prompt_key(pair.prompt), []).append(pair)
    scored: dict[object, dict[str, float]] = {}
    skipped = 0
    gate = asyncio.Semaphore(batch)

    async def one(key: object, group: list[PreferencePair]) -> None:
        nonlocal skipped
        texts = list(dict.fromkeys(t for p in group for t in (p.chosen, p.rejected)))
        prompt = group[0].prompt
        async with gate:
            try:
                with scorer.open(prompt if isinstance(prompt, str) else list(prompt)) as session:
                    values = await session.score(texts, [True] * len(texts))
                scored[key] = dict(zip(texts, values))
            except ScorerContextError:
                skipped += len(group)
        if progress is not None:
            progress(len(group))

    await asyncio.gather(*(one(key, group) for key, group in by_prompt.items()))
    scores: list[PairScore] = []
    groups: list[list[tuple[float, float]]] = []
    for number, (key, group) in enumerate(by_prompt.items()):
        if key not in scored:
            continue
        guide = scored[key]
        judged = {t: judge(t) for t in guide} if judge is not None else {}
        groups.append([(guide[t], judged.get(t, math.nan)) for t in guide])
        for p in group:
            scores.append(PairScore(p.line, number, prompt_chars(p.prompt), len(p.chosen), len(p.rejected),
                                    guide[p.chosen], guide[p.rejected], judged.get(p.chosen), judged.get(p.rejected)))
    if not scores:
        raise ScorerContextError("prompt", f"none of the {skipped} pairs fits the guide's context")
    scores.sort(key=lambda s: s.line)
    return summarize(scores, skipped, judge_name if judge is not None else None, groups)
