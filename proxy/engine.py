"""The engine: the one owner of an upstream and a scorer, shared by every search run through it.

    async with Engine(load_config("paper-cbs-w4k4l30")) as engine:
        result = await engine.search(Conversation.instruction("Write a haiku."))
        print(engine.summarize(result))

It builds the upstream (its connection pool, retry policy and concurrency limit) and loads the
scorer off the event loop (setting torch's thread pool first, once, from
`scorer.torch_threads`), answers readiness (`probe`), keeps the running usage, and summarizes
results the one way every adapter reports them. A request becomes a checked plan (`plan`:
conversation, settings, the scorer it runs with, its context room) that `run` runs, so every
check is made once and before anything is paid for. The server (proxy.serving), the Python client
(proxy.client), the CLI and the AlpacaEval runner are adapters over it. An upstream or scorer
handed in is used as it is and never closed here; what the engine built, it closes, once.

`start()` waits for the scorer. A server that must listen first calls `open()`, then
`begin_loading()`, and asks `scorer_state` or `wait_ready()` meanwhile.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

from proxy.budget import Budget
from proxy.config import AppConfig, Prices, ScorerConfig, SearchConfig
from proxy.config.extras import require_scorer_extra
from proxy.cost import cost_usd
from proxy.search import SearchPlan, SearchResult, StepCallback, StoppedBy, needs_scorer, plan_search, \
    require_scorer, run_plan
from proxy.search.plan import SettingTooSmall
from proxy.types import Conversation, Usage
from proxy.upstreams.base import Upstream
from proxy.upstreams.registry import make_upstream
from scorers.base import Scorer

log = logging.getLogger("w2s.engine")


class ScorerState(StrEnum):
    """Where the engine's scorer is: what readiness and a refused guided search report."""

    NONE = "none"
    """None configured: only plain sampling."""
    NOT_STARTED = "not started"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class ScorerUnavailable(RuntimeError):
    """A guided search while the scorer is still loading, or after it failed to load."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.loading = state == "loading"
        super().__init__(f"the scorer is {'still loading' if self.loading else state}")


@dataclass(frozen=True)
class Readiness:
    """`probe()`: can guided requests be served now, and if not, why."""

    ready: bool
    upstream: str
    """"reachable", "in-process", "not started", "refused: HTTP 401", "unreachable: ...", "model unknown: ..."."""
    scorer: str
    """A ScorerState, and for `failed` the kind of failure: "failed: OSError (see the server log)"."""


@dataclass(frozen=True)
class Spend:
    """What the engine's upstream was billed so far, over every search (failed ones included)."""

    usage: Usage
    calls: int
    cost_usd: float


@dataclass(frozen=True)
class ResultSummary:
    """What one search did: the one summary the CLI, the server's `w2s` field and the runner report."""

    mode: str
    score: float | None
    finished: bool
    steps: int
    upstream_calls: int
    tokens: int
    """Upstream tokens in the answer."""
    prompt_tokens: int
    """Billed for the whole search, not only the answer (as are completion_tokens and cost_usd)."""
    completion_tokens: int
    cost_usd: float
    wall_s: float
    stopped_by: StoppedBy | None = None
    """Set when a budget or the deadline ended the search before its beams ended."""
    cached_tokens: int = 0
    """Of prompt_tokens, those the upstream read from its prompt cache."""
    cache_write_tokens: int = 0
    """Of prompt_tokens, those the upstream wrote to its prompt cache."""


def summarize(result: SearchResult, prices: Prices, mode: str | None = None) -> ResultSummary:
    """`mode` names the search as its caller knows it (a server's mode alias); default: W, K, L."""
    u = result.usage
    return ResultSummary(mode=mode or result.mode, score=result.score, finished=result.finished,
                         steps=len(result.steps), upstream_calls=result.calls, tokens=result.tokens,
                         prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                         cost_usd=cost_usd(u, prices), wall_s=round(result.wall_s, 4), stopped_by=result.stopped_by,
                         cached_tokens=u.cached_tokens, cache_write_tokens=u.cache_write_tokens)


async def _open_scorer(cfg: ScorerConfig) -> Scorer:
    """torch's thread pool (the process's models are the engine's), then the scorer; torch is
    imported only here, on a worker thread."""
    from scorers import registry

    await asyncio.to_thread(registry.set_torch_threads, cfg.torch_threads)
    return await registry.open_scorer(cfg)


class Engine:
    def __init__(self, config: AppConfig, *, upstream: Upstream | None = None, scorer: Scorer | None = None) -> None:
        self.config = config
        self._upstream = upstream
        self._owns_upstream = upstream is None
        self._scorer = scorer
        self._owns_scorer = scorer is None
        self._started = False
        self._upstream_closed = False
        self._load_task: asyncio.Task[None] | None = None
        self._load_error: BaseException | None = None
        self.scorer_state = self._idle_state() if scorer is None else ScorerState.LOADED
        self._failure = ""

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Build the upstream (no I/O yet); idempotent. After `aclose` it builds a new one."""
        if self._scorer is None and self.config.scorer is not None:  # before a server listens
            require_scorer_extra(self.config.scorer.kind)  # MissingExtra names the extra to install
        if self._upstream is None or (self._owns_upstream and self._upstream_closed):
            self._upstream = make_upstream(self.config.upstream)
            self._upstream_closed = False
        self._started = True

    def begin_loading(self) -> None:
        """Start loading the configured scorer on a worker thread; idempotent."""
        if self._scorer is not None or self.config.scorer is None or self._load_task is not None:
            return
        self.scorer_state = ScorerState.LOADING
        self._load_task = asyncio.create_task(self._load(self.config.scorer))

    async def _load(self, cfg: ScorerConfig) -> None:
        try:
            self._scorer = await _open_scorer(cfg)
            self.scorer_state = ScorerState.LOADED
            log.info("scorer loaded")
        except Exception as e:  # noqa: BLE001 - reported by probe(), wait_ready() and every guided search
            self._load_error = e
            # What clients see (the 503, /health/ready) names the kind of failure only: the message
            # may hold the server's local paths. The log has all of it.
            self.scorer_state, self._failure = ScorerState.FAILED, type(e).__name__
            log.error("scorer failed to load: %s: %s", type(e).__name__, e)

    async def wait_ready(self) -> None:
        """Return once the scorer is loaded (at once without one); ScorerUnavailable if it failed."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        if self._load_error is not None:
            raise ScorerUnavailable(self.scorer_status) from self._load_error

    async def start(self) -> None:
        """Open the upstream and load the scorer, waiting for it; closes again if that fails."""
        require_scorer(self.config.search, self.guided)
        self.open()
        self.begin_loading()
        try:
            await self.wait_ready()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close what this engine built, once; what was handed in stays open. `start` (or
        `open`) afterwards builds anew."""
        task, self._load_task, self._load_error = self._load_task, None, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._started = False
        if self._owns_upstream and self._upstream is not None and not self._upstream_closed:
            self._upstream_closed = True  # kept, closed, for its running usage
            await self._upstream.aclose()
        if self._owns_scorer:
            scorer, self._scorer = self._scorer, None
            self.scorer_state = self._idle_state()
            if scorer is not None:
                await scorer.aclose()

    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ what it offers

    def _idle_state(self) -> ScorerState:
        return ScorerState.NOT_STARTED if self.config.scorer else ScorerState.NONE

    @property
    def scorer_status(self) -> str:
        """The state as clients see it: a failure names its kind only (the message may hold the
        server's local paths; the log has all of it)."""
        if self.scorer_state is ScorerState.FAILED:
            return f"failed: {self._failure} (see the server log)"
        return self.scorer_state.value

    @property
    def started(self) -> bool:
        return self._started

    @property
    def upstream(self) -> Upstream:
        if not self._started or self._upstream is None:
            raise RuntimeError("engine not started: use `async with Engine(...)` or `await engine.start()`")
        return self._upstream

    @property
    def scorer(self) -> Scorer | None:
        return self._scorer

    @property
    def guided(self) -> bool:
        """A scorer is here or configured (loaded or not): guided searches can be offered."""
        return self._scorer is not None or self.config.scorer is not None

    @property
    def usage(self) -> Spend:
        """Running totals of the upstream (readable after `aclose`, restarted by a new upstream)."""
        up = self._upstream
        usage, calls = (up.usage, up.api_calls) if up is not None else (Usage(), 0)
        return Spend(usage, calls, cost_usd(usage, self.config.upstream.prices))

    async def probe(self) -> Readiness:
        """Upstream reachable (one request, no retries) with the model listed, scorer loaded."""
        if not self._started or self._upstream is None:
            upstream_ok, upstream_state = False, "not started"
        else:
            p = await self._upstream.probe()
            upstream_ok, upstream_state = p.ok, str(p)
        scorer_ok = self.scorer_state in (ScorerState.LOADED, ScorerState.NONE)
        return Readiness(upstream_ok and scorer_ok, upstream_state, self.scorer_status)

    async def plan(self, conversation: Conversation | str, search_config: SearchConfig | None = None, *,
                   score_plain: bool = True) -> SearchPlan:
        """A checked search of `conversation` (a string: a raw completion prompt; default config:
        `config.search`), see proxy.search.plan_search: ConfigError without a scorer configured
        for a search that ranks, ScorerUnavailable while the scorer loads or after it failed,
        ScorerContextError when the prompt or answer cannot fit the scorer's context. A server
        plans before answering, so a stream is refused before its 200 goes out. The context check
        tokenizes the prompt (seconds for a megabyte): it runs where the scorer tokenizes
        (`Scorer.run_tokenizing`), never on the event loop."""
        cfg = search_config if search_config is not None else self.config.search
        scorer = self._scorer
        if scorer is None and needs_scorer(cfg):
            require_scorer(cfg, self.config.scorer is not None)
            raise ScorerUnavailable(self.scorer_status)
        check = partial(plan_search, conversation, cfg, scorer, score_plain=score_plain)
        if scorer is not None and (score_plain or needs_scorer(cfg)):
            plan = await scorer.run_tokenizing(check)
        else:
            plan = check()
        self._check_own_caps(plan)
        return plan

    def _check_own_caps(self, plan: SearchPlan) -> None:
        """SettingTooSmall when the search's own cap cannot pay for its first step's samples (the
        prompt's tokens not even counted): it would be billed nothing and answer nothing."""
        cfg, bound, prices = plan.settings, plan.first_step_bound, self.config.upstream.prices
        if not Budget(cfg.max_upstream_tokens, None, prices).allows(bound):
            raise SettingTooSmall("max_upstream_tokens", f"{cfg.max_upstream_tokens} cannot pay for the first "
                                  f"step, which may take {bound.total_tokens} completion tokens (and the prompt's)")
        if not Budget(None, cfg.max_cost_usd, prices).allows(bound):
            raise SettingTooSmall("max_cost_usd", f"{cfg.max_cost_usd} cannot pay for the first step, which may "
                                  f"cost ${cost_usd(bound, prices):.6f} (and the prompt)")

    async def run(self, plan: SearchPlan, *, on_step: StepCallback | None = None,
                  budget: Budget | None = None) -> SearchResult:
        """Run a planned search. Its own caps (`max_upstream_tokens`, `max_cost_usd`, at the
        upstream's prices) nest under `budget` (an API key's, a run's) when one is given."""
        cfg = plan.settings
        capped = cfg.max_upstream_tokens is not None or cfg.max_cost_usd is not None
        if capped or budget is not None:
            budget = Budget(cfg.max_upstream_tokens, cfg.max_cost_usd, self.config.upstream.prices, parent=budget)
        return await run_plan(plan, self.upstream, on_step=on_step, budget=budget)

    async def search(self, conversation: Conversation | str, search_config: SearchConfig | None = None, *,
                     on_step: StepCallback | None = None, score_plain: bool = True,
                     budget: Budget | None = None) -> SearchResult:
        """`plan` then `run`. Plain sampling (w = k = 1) is scored when a scorer is loaded,
        unless `score_plain` is False."""
        plan = await self.plan(conversation, search_config, score_plain=score_plain)
        return await self.run(plan, on_step=on_step, budget=budget)

    def summarize(self, result: SearchResult, mode: str | None = None) -> ResultSummary:
        return summarize(result, self.config.upstream.prices, mode)
