"""A small Prometheus registry: counters, gauges and histograms rendered in the text format.

The server needs a dozen metrics and no push gateway, multiprocess mode or collectors, so a
hundred lines beat a dependency. Everything runs on the event loop, so no locks are needed.
Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (version 0.0.4).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.search import StepTrace

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]

#: Seconds, from a fast pass-through to a long guided search.
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                      2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(v: float) -> str:
    """Integers without a trailing .0, infinities as Prometheus spells them."""
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A value that only goes up; the name should end in `_total`."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}"
                                for k, v in sorted(self._values.items())]


class Gauge(Counter):
    """A value that goes up and down (requests in flight)."""

    kind = "gauge"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = value


class Histogram(_Metric):
    """Observations counted into cumulative `le` buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not self.buckets:
            raise ValueError(f"{self.name}: at least one finite bucket is needed")
        # per label set: [per-bucket counts (not cumulative) + overflow, sum]
        self._series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = ([0] * (len(self.buckets) + 1), [0.0])
        series[0][bisect.bisect_left(self.buckets, value)] += 1  # le is inclusive
        series[1][0] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        lines = self.header()
        for key, (counts, total) in sorted(self._series.items()):
            cumulative = 0
            for bound, c in zip((*self.buckets, math.inf), counts):
                cumulative += c
                le = f'le="{format_value(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {format_value(total[0])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {cumulative}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labelnames))  # type: ignore[return-value]

    def histogram(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                  buckets: Iterable[float] = LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help_text, labelnames, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        return "".join(line + "\n" for m in self._metrics.values() for line in m.render())


class ServerMetrics:
    """What the guidance server exports: traffic, upstream spend, scoring work, latencies."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter("w2s_requests_total", "HTTP requests by route and status code",
                                  ("endpoint", "status"))
        self.request_seconds = r.histogram("w2s_request_duration_seconds",
                                           "Time to the last byte of each HTTP request", ("endpoint",))
        self.in_flight = r.gauge("w2s_generations_in_flight", "Completion and chat requests being served")
        self.searches = r.counter("w2s_searches_total", "Searches by outcome (finished, length, error, cancelled)",
                                  ("outcome",))
        self.steps = r.counter("w2s_search_steps_total", "Search steps run")
        self.upstream_calls = r.counter("w2s_upstream_calls_total", "Successful upstream HTTP calls")
        self.upstream_tokens = r.counter("w2s_upstream_tokens_total", "Tokens billed by the upstream",
                                         ("kind",))
        self.upstream_cost = r.counter("w2s_upstream_cost_usd_total", "Upstream cost at the configured prices")
        self.scored_candidates = r.counter("w2s_scored_candidates_total", "Candidates scored by the model pair")
        self.scored_tokens = r.counter("w2s_scored_tokens_total",
                                       "Upstream tokens in the scored candidates (whole responses so far)")
        self.step_upstream_seconds = r.histogram("w2s_step_upstream_seconds",
                                                 "Slowest upstream request of each search step")
        self.step_scoring_seconds = r.histogram("w2s_step_scoring_seconds",
                                                "Scoring time of each search step, summed over its beams")
        for kind in ("prompt", "completion"):
            self.upstream_tokens.inc(0, kind=kind)

    def render(self) -> str:
        return self.registry.render()

    def observe_step(self, trace: StepTrace, cost_usd: float) -> None:
        """Called after every search step, so cancelled and failed searches count what they spent."""
        self.steps.inc()
        self.upstream_calls.inc(trace.calls)
        self.upstream_tokens.inc(trace.usage.prompt_tokens, kind="prompt")
        self.upstream_tokens.inc(trace.usage.completion_tokens, kind="completion")
        self.upstream_cost.inc(cost_usd)
        scored = [c for c in trace.candidates if c.score is not None]
        self.step_upstream_seconds.observe(trace.upstream_s)
        if scored:
            self.scored_candidates.inc(len(scored))
            self.scored_tokens.inc(sum(c.tokens for c in scored))
            self.step_scoring_seconds.observe(trace.scoring_s)
