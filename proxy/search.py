"""Chunk-level beam search (CBS), the one loop behind base sampling, best-of-N and CBS.

Each step asks the upstream for K continuations of every live beam (the beams go together in
as few requests as the upstream allows, see `Upstream.max_prompts_per_call`, all requests of
a step in flight at once), scores each request's candidates as soon as it returns, and keeps
the W best of the new candidates plus the beams carried from earlier steps (finished, or
out of budget). A carried beam keeps its score, is never expanded again and occupies one slot
at most. The first step draws W·K continuations of the prompt in one request, as the paper's
reference code does (it starts from W·K copies of the prompt), so the first selection already
chooses W of W·K; `SearchConfig.narrow_start` draws K instead.

Selection follows the paper (Zhou et al. 2024, and its reference code): the top W by score
alone, and the answer is the top-scored beam, finished or not. Finishing counts only through
the EOS term the scorer adds to a finished response. Ranking finished answers first instead
makes best-of-N return whichever sample happened to end inside the budget (often a short
refusal) whatever its score, which an independent judge scored below plain sampling; it is
kept as the opt-in `SearchConfig.prefer_finished`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from proxy.budget import Budget
from proxy.config import SearchConfig, require_scorer
from proxy.types import Continuation, Conversation, SamplingParams, Usage, derive_seed, first_stop
from proxy.upstreams.base import Upstream
from scorers.base import Scorer, ScoringSession, check_room


@dataclass
class Candidate:
    """One node of the search tree: a whole response so far."""

    id: int
    parent: int | None
    step: int
    chunk: str
    """Text this node added to its parent."""
    text: str
    tokens: int
    """Upstream tokens in `text`."""
    finished: bool
    score: float | None = None
    finish_reason: str | None = None
    survived: bool = False
    stalled: bool = False
    """The upstream returned nothing new without finishing (e.g. context window full)."""


@dataclass
class StepTrace:
    step: int
    expanded: list[int]
    """Ids of the beams expanded in this step."""
    candidates: list[Candidate]
    """New candidates of this step, in beam order then sample order."""
    carried: list[int]
    """Ids of earlier beams that took part in the selection without being expanded."""
    survivors: list[int]
    """Ids kept, best first."""
    usage: Usage
    calls: int
    upstream_s: float
    """Slowest upstream request of the step."""
    scoring_s: float
    """Scoring time summed over the step's requests."""
    wall_s: float


@dataclass
class SearchResult:
    text: str
    score: float | None
    finished: bool
    tokens: int
    config: SearchConfig
    steps: list[StepTrace] = field(default_factory=list)
    usage: Usage = Usage()
    calls: int = 0
    wall_s: float = 0.0
    chosen: int = 0
    nodes: dict[int, Candidate] = field(default_factory=dict)
    stopped_by: str | None = None
    """Why the search ended before its beams did: "budget" (the next step could have cost more
    than the search's own cap allowed) or "shared budget" (more than a budget it shares, an API
    key's or a run's, had left), or "deadline" (`deadline_s` passed); None when it ran its course."""

    @property
    def path(self) -> list[int]:
        """Ids from the first chunk to the chosen node."""
        out: list[int] = []
        node: int | None = self.chosen
        while node is not None and node != 0:
            out.append(node)
            node = self.nodes[node].parent
        return out[::-1]


StepCallback = Callable[[StepTrace, list[Candidate]], Awaitable[None] | None]


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


def chunk_limit(cfg: SearchConfig, tokens: int) -> int:
    """The next chunk's token limit for a beam that has `tokens`: L, or what is left of
    `max_new_tokens` if less."""
    left = cfg.max_new_tokens - tokens
    return min(cfg.l or left, left)


def first_step_bound(cfg: SearchConfig) -> Usage:
    """The most a search's first step can be billed that is known before it is sent: its W·K
    (narrow: K) samples of the prompt at the chunk limit; the prompt's tokens are not known yet.
    The server refuses a request whose key cannot pay even this."""
    return Usage(0, cfg.fan_out(1) * chunk_limit(cfg, 0))


def _score(c: Candidate) -> float:
    return c.score if c.score is not None else 0.0


class _Search:
    """State of one search; `run` drives it."""

    def __init__(self, conversation: Conversation, upstream: Upstream, session: ScoringSession | None,
                 cfg: SearchConfig, on_step: StepCallback | None, budget: Budget | None = None) -> None:
        self.conversation = conversation
        self.budget = budget
        self.upstream = upstream
        self.session = session
        self.cfg = cfg
        self.on_step = on_step
        root = Candidate(id=0, parent=None, step=0, chunk="", text="", tokens=0, finished=False,
                         score=0.0 if session else None, survived=True)
        self.nodes: dict[int, Candidate] = {0: root}
        self.result = SearchResult(text="", score=root.score, finished=False, tokens=0, config=cfg, nodes=self.nodes)

    def expandable(self, b: Candidate) -> bool:
        return not b.finished and not b.stalled and b.tokens < self.cfg.max_new_tokens

    def rank_key(self, c: Candidate) -> tuple[bool, float]:
        """Score order. With `prefer_finished`, a dead end (out of budget, unfinished) ranks
        below every answer that is complete or can still grow, kept only when nothing else is."""
        alive = c.finished or self.expandable(c) if self.cfg.prefer_finished else True
        return (alive, _score(c))

    def _new_node(self, parent: Candidate, step: int, c: Continuation) -> Candidate:
        chunk, hit_stop = cut_at_stop(parent.text, c.text, self.cfg.stop)
        node = Candidate(
            id=len(self.nodes), parent=parent.id, step=step, chunk=chunk, text=parent.text + chunk,
            tokens=parent.tokens + c.num_tokens, finished=c.finished or hit_stop,
            finish_reason="stop" if hit_stop else c.finish_reason,
            stalled=c.num_tokens == 0 and not c.finished,
        )
        self.nodes[node.id] = node
        return node

    def _requests(self, live: list[Candidate]) -> list[list[tuple[int, Candidate]]]:
        """Live beams (with their index) grouped into upstream requests: same token budget, at
        most `max_prompts_per_call` each."""
        per_call = max(1, self.upstream.max_prompts_per_call)
        by_budget: dict[int, list[tuple[int, Candidate]]] = {}
        for i, b in enumerate(live):
            by_budget.setdefault(self._max_tokens(b), []).append((i, b))
        return [group[j:j + per_call] for group in by_budget.values() for j in range(0, len(group), per_call)]

    def _max_tokens(self, beam: Candidate) -> int:
        return chunk_limit(self.cfg, beam.tokens)

    def _params(self, max_tokens: int, n: int) -> SamplingParams:
        cfg = self.cfg
        return SamplingParams(n=n, max_tokens=max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop=tuple(cfg.stop))

    async def _expand(self, request: list[tuple[int, Candidate]], step: int
                      ) -> tuple[list[Candidate], Usage, int, float, float]:
        cfg = self.cfg
        beams = [b for _, b in request]
        n = cfg.fan_out(step)
        t0 = time.perf_counter()
        res = await self.upstream.sample_batch(self.conversation, [b.text for b in beams],
                                               self._params(self._max_tokens(beams[0]), n),
                                               seeds=[derive_seed(cfg.seed, step, i) for i, _ in request])
        t1 = time.perf_counter()
        conts = res.continuations
        cands = [self._new_node(b, step, c) for j, b in enumerate(beams) for c in conts[j * n:(j + 1) * n]]
        if self.session is not None:
            scores = await self.session.score([c.text for c in cands], [c.finished for c in cands])
            for c, s in zip(cands, scores):
                c.score = s
        return cands, res.usage, res.calls, t1 - t0, time.perf_counter() - t1

    def _step_bound(self, live: list[Candidate]) -> Usage:
        """The most the next step can be billed: every live beam's K samples at their token
        limit, and per beam the prompt tokens the last step was billed per beam (fan-out
        included), grown by one chunk; the first step's is `first_step_bound`."""
        if not self.result.steps:
            return first_step_bound(self.cfg)
        completion = sum(self.cfg.k * self._max_tokens(b) for b in live)
        last = self.result.steps[-1]
        per_beam = last.usage.prompt_tokens / max(1, len(last.expanded))
        return Usage(int(len(live) * per_beam) + completion, completion)

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

    async def run(self) -> SearchResult:
        t_start = time.perf_counter()
        beams = [self.nodes[0]]
        step = 0
        while live := [b for b in beams if self.expandable(b)]:
            blocker = None if self.budget is None else self.budget.blocker(self._step_bound(live))
            if blocker is not None:
                self.result.stopped_by = "budget" if blocker is self.budget else "shared budget"
                break
            left = None if self.cfg.deadline_s is None else self.cfg.deadline_s - (time.perf_counter() - t_start)
            if left is not None and left <= 0:
                self.result.stopped_by = "deadline"
                break
            step += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(left):
                    outs = await asyncio.gather(*(self._expand(r, step) for r in self._requests(live)))
            except TimeoutError:  # the step is dropped; what it was billed is in upstream.usage
                self.result.stopped_by = "deadline"
                break
            new = [c for out in outs for c in out[0]]
            carried = [b for b in beams if not self.expandable(b) and b.id != 0]
            pool = self._distinct(carried + new)
            survivors = sorted(pool, key=self.rank_key, reverse=True)[: self.cfg.w]
            if self.session is not None:  # losers' caches go now, not at the next step
                self.session.keep([s.text for s in survivors if self.expandable(s)])
            kept = {s.id for s in survivors}
            for c in new:
                c.survived = c.id in kept
            trace = StepTrace(
                step=step, expanded=[b.id for b in live], candidates=new, carried=[b.id for b in carried],
                survivors=[s.id for s in survivors],
                usage=sum((o[1] for o in outs), Usage()), calls=sum(o[2] for o in outs),
                upstream_s=max(o[3] for o in outs), scoring_s=sum(o[4] for o in outs),
                wall_s=time.perf_counter() - t0,
            )
            self.result.steps.append(trace)
            if self.budget is not None:
                self.budget.charge(trace.usage)
            if self.on_step is not None:
                maybe = self.on_step(trace, survivors)
                if maybe is not None:
                    await maybe
            beams = survivors
        finished = [b for b in beams if b.finished] if self.cfg.prefer_finished else []
        best = max(finished or beams, key=_score)
        r = self.result
        r.text, r.score, r.finished, r.tokens, r.chosen = best.text, best.score, best.finished, best.tokens, best.id
        r.usage = sum((s.usage for s in r.steps), Usage())
        r.calls = sum(s.calls for s in r.steps)
        r.wall_s = time.perf_counter() - t_start
        return r


async def search(
    conversation: Conversation | str,
    upstream: Upstream,
    scorer: Scorer | None,
    cfg: SearchConfig,
    *,
    on_step: StepCallback | None = None,
    budget: Budget | None = None,
    room_checked: bool = False,
) -> SearchResult:
    """Guided generation of an answer to `conversation` (a string: a raw completion prompt).

    The upstream renders the conversation and each beam's partial answer its own way; the
    scoring pair sees `conversation.scorer_prompt`, rendered by each model's own template.
    Without a scorer only plain sampling (w = k = 1) is possible; with one, every candidate is
    scored, and a prompt or `max_new_tokens` that cannot fit the scorer's context is refused
    (ScorerContextError) before the upstream is called. With a `budget` (proxy.budget) the search
    stops before a step that could exceed it and answers with its best beam, `stopped_by` saying
    whose budget it was. `room_checked`: the caller has made that context check already
    (`scorers.base.check_room`; it renders and tokenizes the prompt, so it is done once).
    """
    require_scorer(cfg, scorer is not None)
    conv = Conversation.completion(conversation) if isinstance(conversation, str) else conversation
    if scorer is not None and not room_checked:
        check_room(scorer, conv.scorer_prompt, cfg.max_new_tokens)  # before the upstream is paid for anything
    session = scorer.open(conv.scorer_prompt) if scorer else None
    try:
        return await _Search(conv, upstream, session, cfg, on_step, budget).run()
    finally:
        if session is not None:
            session.close()
