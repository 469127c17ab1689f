"""Chunk-level beam search (CBS), whose settings also give base sampling and best-of-N.

Each step asks the upstream for K continuations of every live beam (the beams go together in
as few requests as the upstream allows, see `Upstream.max_prompts_per_call`, all requests of
a step in flight at once), scores each request's candidates as soon as it returns, and keeps
the W best of the new candidates plus the beams carried from earlier steps (finished, or
out of budget). A carried beam keeps its score, is never expanded again and occupies one slot
at most. The first step draws W·K continuations of the prompt in one request, as the paper's
reference code does (it starts from W·K copies of the prompt), so the first selection already
chooses W of W·K; the `narrow_start` setting draws K instead.

Selection follows the paper (Zhou et al. 2024, and its reference code): the top W by score
alone, and the answer is the top-scored beam, finished or not. Finishing counts only through
the EOS term the scorer adds to a finished response. Ranking finished answers first instead
makes best-of-N return whichever sample happened to end inside the budget (often a short
refusal) whatever its score, which an independent judge scored below plain sampling; it is
kept as the opt-in `prefer_finished` setting.

Two departures from the paper, off by default, spend the samples where they matter: a
`sample_schedule` sets how many chunks each step draws per beam (e.g. more for the opening
chunks), and a `horizon` searches only the first H tokens, then finishes the chosen beam with one
plain continuation (one sample, the rest of `max_new_tokens`, scored like any candidate).

Every later beam extends a survivor of the step before (a child is its parent's text plus a
chunk; a finished beam is carried as it is), so the text all survivors share is final.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.search.base import SearchAlgorithm, score_of
from proxy.search.trace import Candidate, StepTrace
from proxy.types import Usage


def searched_tokens(cfg: Any) -> int:
    """How far the search goes: `horizon` tokens, or all of `max_new_tokens`."""
    return min(cfg.horizon or cfg.max_new_tokens, cfg.max_new_tokens)


def chunk_limit(cfg: Any, tokens: int) -> int:
    """The next chunk's token limit for a beam that has `tokens`: L, or what is left of the
    searched tokens if less."""
    left = searched_tokens(cfg) - tokens
    return min(cfg.l or left, left)


def fan_out(cfg: Any, step: int) -> int:
    """Chunks drawn per expanded beam at `step` (1-based): by default W·K from the prompt at the
    first (the paper's start, one beam standing for W), K after; with a `sample_schedule`, its
    entry for the step (the last one repeated)."""
    if cfg.sample_schedule:
        return cfg.sample_schedule[min(step, len(cfg.sample_schedule)) - 1]
    return cfg.k if step > 1 or cfg.narrow_start else cfg.w * cfg.k


class ChunkBeamSearch(SearchAlgorithm):
    @classmethod
    def label(cls, cfg: Any) -> str:
        if not cls.needs_scorer(cfg) and cfg.l is None:
            return "base"
        if cfg.w == 1 and cfg.l is None:
            return f"bon{cfg.k}"
        narrow = "-narrow" if cfg.narrow_start and cfg.w > 1 else ""
        horizon = f"-h{cfg.horizon}" if cfg.horizon is not None else ""
        schedule = "-s" + ".".join(map(str, cfg.sample_schedule)) if cfg.sample_schedule else ""
        return f"cbs-w{cfg.w}k{cfg.k}l{cfg.l if cfg.l is not None else 'inf'}{narrow}{horizon}{schedule}"

    @classmethod
    def needs_scorer(cls, cfg: Any) -> bool:
        return cfg.w * cfg.k > 1 or any(n > 1 for n in cfg.sample_schedule or ())

    @classmethod
    def first_step_bound(cls, cfg: Any) -> Usage:
        """Its W·K (narrow: K) samples of the prompt at the chunk limit."""
        return Usage(0, fan_out(cfg, 1) * chunk_limit(cfg, 0))

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.beams = [self.nodes[0]]
        self.finishing: Candidate | None = None
        """With a horizon: the chosen beam, once the search is over, while it is finished off."""

    def expandable(self, b: Candidate) -> bool:
        return not b.finished and not b.stalled and b.tokens < searched_tokens(self.cfg)

    def _limit(self, b: Candidate) -> int:
        """The next chunk's token limit of `b`: the chunk limit, or all that is left when it is
        being finished off."""
        return self.cfg.max_new_tokens - b.tokens if b is self.finishing else chunk_limit(self.cfg, b.tokens)

    def rank_key(self, c: Candidate) -> tuple[bool, float]:
        """Score order. With `prefer_finished`, a dead end (out of budget, unfinished) ranks
        below every answer that is complete or can still grow, kept only when nothing else is."""
        can_grow = not c.stalled and c.tokens < self.cfg.max_new_tokens
        alive = c.finished or can_grow if self.cfg.prefer_finished else True
        return (alive, score_of(c))

    def live(self) -> list[Candidate]:
        searching = [b for b in self.beams if self.expandable(b)]
        if searching or self.cfg.horizon is None or self.finishing is not None:
            return searching
        best = self.answer()
        if best.finished or best.stalled or best.tokens >= self.cfg.max_new_tokens:
            return []
        self.finishing = best
        return [best]

    def next_step_bound(self, live: list[Candidate]) -> Usage:
        """Every live beam's K samples at their token limit, and per beam the prompt tokens the
        last step was billed per beam (fan-out included), grown by one chunk; the first step's
        is `first_step_bound`."""
        if not self.steps:
            return self.first_step_bound(self.cfg)
        n = 1 if self.finishing is not None else fan_out(self.cfg, len(self.steps) + 1)
        completion = sum(n * self._limit(b) for b in live)
        last = self.steps[-1]
        per_beam = last.usage.prompt_tokens / max(1, len(last.expanded))
        return Usage(int(len(live) * per_beam) + completion, completion)

    def _requests(self, live: list[Candidate]) -> list[list[tuple[int, Candidate]]]:
        """Live beams (with their index) grouped into upstream requests: same token budget, at
        most `max_prompts_per_call` each."""
        per_call = max(1, self.upstream.max_prompts_per_call)
        by_budget: dict[int, list[tuple[int, Candidate]]] = {}
        for i, b in enumerate(live):
            by_budget.setdefault(self._limit(b), []).append((i, b))
        return [group[j:j + per_call] for group in by_budget.values() for j in range(0, len(group), per_call)]

    @staticmethod
    def _distinct(pool: list[Candidate]) -> list[Candidate]:
        """Identical responses would take several slots for one beam: keep the first."""
        seen: set[tuple[str, bool]] = set()
        out = []
        for c in pool:
            key = (c.text, c.finished)
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out

    async def step(self, number: int, live: list[Candidate]) -> tuple[StepTrace, list[Candidate]]:
        t0 = time.perf_counter()
        n = 1 if self.finishing is not None else fan_out(self.cfg, number)
        outs = await asyncio.gather(*(
            self.expand([b for _, b in r], [i for i, _ in r], number, n, self._limit(r[0][1]))
            for r in self._requests(live)))
        new = [c for out in outs for c in out.candidates]
        # Finishing off the chosen beam replaces it, whatever its siblings scored.
        carried = [] if self.finishing is not None else [b for b in self.beams if not self.expandable(b) and b.id != 0]
        pool = self._distinct(carried + new)
        survivors = sorted(pool, key=self.rank_key, reverse=True)[: 1 if self.finishing is not None else self.cfg.w]
        if self.session is not None:  # losers' caches go now, not at the next step
            self.session.keep([s.text for s in survivors if self.expandable(s)])
        kept = {s.id for s in survivors}
        for c in new:
            c.survived = c.id in kept
        trace = StepTrace(
            step=number, expanded=[b.id for b in live], candidates=new, carried=[b.id for b in carried],
            survivors=[s.id for s in survivors],
            usage=sum((o.usage for o in outs), Usage()), calls=sum(o.calls for o in outs),
            upstream_s=max(o.upstream_s for o in outs), scoring_s=sum(o.scoring_s for o in outs),
            wall_s=time.perf_counter() - t0,
        )
        self.beams = survivors
        return trace, survivors

    def answer(self) -> Candidate:
        finished = [b for b in self.beams if b.finished] if self.cfg.prefer_finished else []
        return max(finished or self.beams, key=score_of)
