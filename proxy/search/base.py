"""The contract of a search algorithm, and the one loop that drives every algorithm.

An algorithm grows a tree of candidate answers step by step: each step asks the upstream for
continuations of some nodes, has the scoring session score them, and keeps some. What it must
tell the rest of the system is small, and is all this contract asks:

- `label(cfg)`, `needs_scorer(cfg)`: its name from its settings, and whether it ranks candidates
  (then a scorer is required before anything is paid for);
- `first_step_bound(cfg)`: the most its first step can be billed that is known before it is
  sent (the server refuses a key that cannot pay even that);
- `next_step_bound()`: the most its next step can be billed, asked before every step so that a
  budget (proxy.budget) stops the search a step early rather than a step too far;
- `shared_prefix_is_final`: whether the text every survivor of a step starts with can no longer
  change, which is what lets the server stream a search;
- `live()`, `step()`, `answer()`: what to expand next, one step, and the chosen node.

`drive` runs any algorithm the same way: budgets, the deadline, the step callback, timings and
the result are handled here once, so a new algorithm is one module of its own steps (see
proxy.search.registry for how it is named).
"""
from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy import tracing
from proxy.budget import Budget, Reservation, release_admission
from proxy.search.trace import Candidate, SearchResult, StepCallback, StepTrace
from proxy.types import Continuation, Conversation, SamplingParams, Usage, derive_seed, first_stop
from proxy.upstreams.base import Upstream
from scorers.base import ScoringSession


def cut_at_stop(prev: str, chunk: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `chunk` at a stop sequence that straddles the chunk seam (the upstream cannot see it)."""
    if not stop:
        return chunk, False
    longest = max(len(s) for s in stop)
    start = max(0, len(prev) - longest + 1)
    hit = first_stop(prev[start:] + chunk, stop)
    if hit is None:
        return chunk, False
    cut = hit - (len(prev) - start)
    return chunk[: max(cut, 0)], True


def score_of(c: Candidate) -> float:
    return c.score if c.score is not None else 0.0


@dataclass(frozen=True)
class Expansion:
    """One upstream request's candidates, scored, with what it cost and took."""

    candidates: list[Candidate]
    usage: Usage
    calls: int
    upstream_s: float
    scoring_s: float


class SearchAlgorithm(ABC):
    """One search in progress over an upstream and (maybe) a scoring session."""

    shared_prefix_is_final: ClassVar[bool] = True

    def __init__(self, conversation: Conversation, upstream: Upstream, session: ScoringSession | None,
                 cfg: Any) -> None:
        self.conversation = conversation
        self.upstream = upstream
        self.session = session
        self.cfg = cfg
        root = Candidate(id=0, parent=None, step=0, chunk="", text="", tokens=0, finished=False,
                         score=0.0 if session else None, survived=True)
        self.nodes: dict[int, Candidate] = {0: root}
        self.steps: list[StepTrace] = []

    # ------------------------------------------------------------------ what it says of itself

    @classmethod
    @abstractmethod
    def label(cls, cfg: Any) -> str:
        """The search's name from its settings, e.g. `cbs-w4k4l30`."""

    @classmethod
    def needs_scorer(cls, cfg: Any) -> bool:
        """Does it rank candidates (and so need a scorer)?"""
        return True

    @classmethod
    @abstractmethod
    def first_step_bound(cls, cfg: Any) -> Usage:
        """The most its first step can be billed, known before it is sent (its samples at their
        token limit; the prompt's tokens are not known yet)."""

    # ------------------------------------------------------------------ its steps

    @abstractmethod
    def live(self) -> list[Candidate]:
        """The nodes the next step expands; none: the search is over."""

    @abstractmethod
    def next_step_bound(self, live: list[Candidate]) -> Usage:
        """The most the next step (expanding `live`) can be billed."""

    @abstractmethod
    async def step(self, number: int, live: list[Candidate]) -> tuple[StepTrace, list[Candidate]]:
        """Expand `live` (step `number`, from 1): the step's trace and its survivors, best first."""

    @abstractmethod
    def answer(self) -> Candidate:
        """The chosen node, once the search is over (or was stopped)."""

    # ------------------------------------------------------------------ helpers for steps

    def new_node(self, parent: Candidate, step: int, c: Continuation) -> Candidate:
        """A child of `parent`, cut at a stop sequence that straddles the seam."""
        chunk, hit_stop = cut_at_stop(parent.text, c.text, self.cfg.stop)
        node = Candidate(
            id=len(self.nodes), parent=parent.id, step=step, chunk=chunk, text=parent.text + chunk,
            tokens=parent.tokens + c.num_tokens, finished=c.finished or hit_stop,
            finish_reason="stop" if hit_stop else c.finish_reason,
            stalled=c.num_tokens == 0 and not c.finished,
        )
        self.nodes[node.id] = node
        return node

    async def expand(self, beams: Sequence[Candidate], beam_indices: Sequence[int], step: int, n: int,
                     max_tokens: int) -> Expansion:
        """`n` continuations of each beam in one upstream request (beam i seeded from the
        search's seed, the step and `beam_indices[i]`), scored as soon as they return."""
        cfg = self.cfg
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                stop=tuple(cfg.stop))
        t0 = time.perf_counter()
        res = await self.upstream.sample_batch(self.conversation, [b.text for b in beams], params,
                                               seeds=[derive_seed(cfg.seed, step, i) for i in beam_indices])
        t1 = time.perf_counter()
        conts = res.continuations
        cands = [self.new_node(b, step, c) for j, b in enumerate(beams) for c in conts[j * n:(j + 1) * n]]
        if self.session is not None:
            with tracing.span("w2s.scoring", **{"w2s.step": step, "w2s.candidates": len(cands)}):
                scores = await self.session.score([c.text for c in cands], [c.finished for c in cands])
            for c, s in zip(cands, scores):
                c.score = s
        return Expansion(cands, res.usage, res.calls, t1 - t0, time.perf_counter() - t1)


async def drive(search: SearchAlgorithm, mode: str, *, budget: Budget | None = None,
                on_step: StepCallback | None = None) -> SearchResult:
    """Run `search` to its end, or until a budget or `deadline_s` stops it before a step; the
    answer is then its best so far, and `stopped_by` says why."""
    t_start = time.perf_counter()
    deadline_s = search.cfg.deadline_s
    result = SearchResult(text="", score=None, finished=False, tokens=0, config=search.cfg, mode=mode,
                          steps=search.steps, nodes=search.nodes)
    number = 0
    while live := search.live():
        held: Reservation | None = None
        if budget is not None:  # check and hold the step's bound at once; the admission hold is handed over
            release_admission()
            got = budget.reserve(search.next_step_bound(live))
            if not isinstance(got, Reservation):
                result.stopped_by = "budget" if got is budget else "shared budget"
                break
            held = got
        left = None if deadline_s is None else deadline_s - (time.perf_counter() - t_start)
        try:
            if left is not None and left <= 0:
                result.stopped_by = "deadline"
                break
            number += 1
            try:
                with tracing.span("w2s.search.step", **{"w2s.mode": mode, "w2s.step": number,
                                                        "w2s.beams": len(live)}) as span:
                    async with asyncio.timeout(left):
                        trace, survivors = await search.step(number, live)
                    span.usage(trace.usage)
                    span.set(**{"w2s.candidates": len(trace.candidates), "w2s.survivors": len(survivors),
                                "w2s.upstream.calls": trace.calls})
            except TimeoutError:  # the step is dropped; what it was billed is in upstream.usage
                result.stopped_by = "deadline"
                break
            search.steps.append(trace)
            if budget is not None:
                budget.charge(trace.usage)
        finally:  # charged, failed or cancelled: the hold is released
            if held is not None:
                held.release()
        if on_step is not None:
            maybe = on_step(trace, survivors)
            if maybe is not None:
                await maybe
    best = search.answer()
    result.text, result.score, result.finished, result.tokens, result.chosen = (
        best.text, best.score, best.finished, best.tokens, best.id)
    result.usage = sum((s.usage for s in result.steps), Usage())
    result.calls = sum(s.calls for s in result.steps)
    result.wall_s = time.perf_counter() - t_start
    return result
