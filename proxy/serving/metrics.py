"""What the guidance server exports at /metrics, on prometheus_client.

prometheus_client does the format work (text 0.0.4 or OpenMetrics, chosen by the scraper's
Accept header), the process and Python collectors (CPU, memory, open files, GC; where the
platform offers them), and zeroed series for every label value known at start, so a dashboard
shows 0 rather than "no data" before the first guided request. Each server has its own
CollectorRegistry: two servers in one process (tests, benchmarks) never share or collide.

Label values stay bounded: `mode` is "base", a mode the server serves, "custom" (a request
that set W, K or L itself) or "forwarded" (a plain-mode request passed to the upstream as it is); `kind` of upstream tokens is one of TOKEN_KINDS; `kind` of an
upstream failure is the label of our UpstreamError (timeout, connection, malformed, or
http_<status>, whatever the family's SDK); `model` of a request is a model id the server serves
(GET /v1/models), "other" for any other a client asked for, "none" where no model was named
(other routes, a body that did not parse). Label children are cached, so an observation costs a
dict lookup and a locked add.

The generation code puts what the middleware cannot see on the request: the model asked for
(`MODEL_KEY`) and, for a stream, when its first text went out (`FIRST_TOKEN_KEY`, loop time).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from proxy.upstreams.retry import failure_kind

if TYPE_CHECKING:
    from proxy.search import StepTrace
    from proxy.types import Usage

#: Seconds, from a fast pass-through to a long guided search.
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                      2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OUTCOMES = ("finished", "length", "error", "cancelled")
TOKEN_KINDS = ("prompt_uncached", "prompt_cached", "cache_write", "completion")
"""The `kind` of w2s_upstream_tokens_total: prompt tokens billed uncached, read from the
upstream's prompt cache, written to it; completion tokens. The prompt tokens billed are the
first three summed."""
CUSTOM_MODE = "custom"
FORWARDED_MODE = "forwarded"
"""The `mode` of plain-mode requests forwarded to the upstream as they are (proxy.serving.passthrough)."""
OTHER_MODEL, NO_MODEL = "other", "none"

MODEL_KEY = web.RequestKey("w2s_model", str)
"""The `model` a generation request named (set once its body parsed)."""
FIRST_TOKEN_KEY = web.RequestKey("w2s_first_token", float)
"""perf_counter() when a stream sent its first text (not the role-only opening chunk)."""


class _ModeSeries:
    """The children of one `mode` label value, made once."""

    def __init__(self, m: ServerMetrics, mode: str) -> None:
        self.tokens = {kind: m.upstream_tokens.labels(mode=mode, kind=kind) for kind in TOKEN_KINDS}
        self.cost = m.upstream_cost.labels(mode=mode)
        self.searches = {outcome: m.searches.labels(mode=mode, outcome=outcome) for outcome in OUTCOMES}


class ServerMetrics:
    """Traffic, searches, upstream spend and failures, scoring work, latencies."""

    def __init__(self, modes: Iterable[str] = (), *, models: Iterable[str] = (), process: bool = True) -> None:
        """`modes`: the names of the served modes ("base" and "custom" are always there).
        `models`: the model ids served (the `model` label's values besides "other" and "none").
        `process`: also export the process and Python runtime collectors."""
        r = self.registry = CollectorRegistry()
        if process:
            ProcessCollector(registry=r)  # registers itself only where /proc exists
            PlatformCollector(registry=r)
            GCCollector(registry=r)  # CPython only
        self.requests = Counter("w2s_requests_total", "HTTP requests by route, status code and model",
                                ("endpoint", "status", "model"), registry=r)
        self.request_seconds = Histogram("w2s_request_duration_seconds", "Time to the last byte of each HTTP request",
                                         ("endpoint", "model"), buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("w2s_time_to_first_token_seconds",
                                             "Streams: time from the request to its first text, by model",
                                             ("model",), buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("w2s_generations_in_flight", "Completion and chat requests being served", registry=r)
        self.searches = Counter("w2s_searches_total",
                                "Searches by mode and outcome (finished, length, error, cancelled)",
                                ("mode", "outcome"), registry=r)
        self.steps = Counter("w2s_search_steps_total", "Search steps run", registry=r)
        self.upstream_calls = Counter("w2s_upstream_calls_total", "Successful upstream HTTP calls", registry=r)
        self.upstream_tokens = Counter("w2s_upstream_tokens_total",
                                       "Tokens billed by the upstream, by mode and kind (prompt_uncached, "
                                       "prompt_cached, cache_write, completion)",
                                       ("mode", "kind"), registry=r)
        self.upstream_cost = Counter("w2s_upstream_cost_usd_total",
                                     "Upstream cost at the configured prices, by mode", ("mode",), registry=r)
        self.upstream_errors = Counter("w2s_upstream_errors_total",
                                       "Upstream failures the retry policy gave up on (answered 502/504), by kind",
                                       ("kind",), registry=r)
        self.upstream_retries = Counter("w2s_upstream_retries_total",
                                        "Upstream calls retried by the retry policy, by the failure's kind",
                                        ("kind",), registry=r)
        self.scored_candidates = Counter("w2s_scored_candidates_total", "Candidates scored by the model pair",
                                         registry=r)
        self.scored_tokens = Counter("w2s_scored_tokens_total",
                                     "Upstream tokens in the scored candidates (whole responses so far)", registry=r)
        self.step_upstream_seconds = Histogram("w2s_step_upstream_seconds",
                                               "Slowest upstream request of each search step",
                                               buckets=LATENCY_BUCKETS, registry=r)
        self.step_scoring_seconds = Histogram("w2s_step_scoring_seconds",
                                              "Scoring time of each search step, summed over its beams",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self._modes = {m: _ModeSeries(self, m) for m in dict.fromkeys(("base", *modes, CUSTOM_MODE, FORWARDED_MODE))}
        self._models = set(models)
        self._first_token = {m: self.first_token_seconds.labels(model=m) for m in sorted(self._models)}
        self._routes: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._failures: dict[str, Any] = {}
        self._retries: dict[str, Any] = {}

    # ------------------------------------------------------------------ observations

    def mode_label(self, mode: str) -> str:
        """The `mode` label of a search: its served name, or "custom"."""
        return mode if mode in self._modes else CUSTOM_MODE

    def model_label(self, model: str | None) -> str:
        """The `model` label of a request: a served model id, "other", or "none"."""
        if model is None:
            return NO_MODEL
        return model if model in self._models else OTHER_MODEL

    def request_done(self, endpoint: str, status: int, seconds: float, model: str | None = None) -> None:
        key = (endpoint, str(status), self.model_label(model))
        children = self._routes.get(key)
        if children is None:
            children = self._routes[key] = (
                self.requests.labels(endpoint=endpoint, status=key[1], model=key[2]),
                self.request_seconds.labels(endpoint=endpoint, model=key[2]))
        children[0].inc()
        children[1].observe(seconds)

    def first_token(self, model: str | None, seconds: float) -> None:
        """A stream's time to its first text."""
        label = self.model_label(model)
        child = self._first_token.get(label)
        if child is None:
            child = self._first_token[label] = self.first_token_seconds.labels(model=label)
        child.observe(seconds)

    def search_done(self, mode: str, outcome: str) -> None:
        self._modes[self.mode_label(mode)].searches[outcome].inc()

    def observe_step(self, trace: StepTrace, cost_usd: float, mode: str = "base") -> None:
        """Called after every search step, so cancelled and failed searches count what they spent."""
        self.steps.inc()
        self.observe_usage(trace.usage, trace.calls, cost_usd, mode)
        self.step_upstream_seconds.observe(trace.upstream_s)
        scored = [c for c in trace.candidates if c.score is not None]
        if scored:
            self.scored_candidates.inc(len(scored))
            self.scored_tokens.inc(sum(c.tokens for c in scored))
            self.step_scoring_seconds.observe(trace.scoring_s)

    def observe_usage(self, u: Usage, calls: int, cost_usd: float, mode: str) -> None:
        """What `calls` upstream calls billed, by token kind, and cost."""
        series = self._modes[self.mode_label(mode)]
        self.upstream_calls.inc(calls)
        for kind, count in zip(TOKEN_KINDS, (u.uncached_prompt_tokens, u.cached_tokens, u.cache_write_tokens,
                                             u.completion_tokens)):
            series.tokens[kind].inc(count)
        series.cost.inc(cost_usd)

    def upstream_failed(self, exc: BaseException) -> None:
        """An upstream failure that ended a search (after the retries)."""
        self._by_kind(self.upstream_errors, self._failures, exc).inc()

    def upstream_retried(self, exc: BaseException) -> None:
        """The retry policy's listener (proxy.upstreams.retry.retry_listener): one retry of one call."""
        self._by_kind(self.upstream_retries, self._retries, exc).inc()

    @staticmethod
    def _by_kind(metric: Counter, cache: dict[str, Any], exc: BaseException) -> Any:
        kind = failure_kind(exc)
        child = cache.get(kind)
        if child is None:
            child = cache[kind] = metric.labels(kind=kind)
        return child

    # ------------------------------------------------------------------ reading

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its Content-Type: OpenMetrics when the Accept header asks for it,
        else the Prometheus text format 0.0.4."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def total(self, sample: str, **labels: str) -> float:
        """Sum of the samples named `sample` whose labels include `labels` (0 if none)."""
        return sum(s.value for family in self.registry.collect() for s in family.samples
                   if s.name == sample and labels.items() <= s.labels.items())
