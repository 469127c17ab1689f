"""OpenTelemetry spans: the one module that touches opentelemetry, and a no-op without it.

Four spans, parent to child in one trace: `w2s.request` (one HTTP request of the guidance server,
continuing the caller's trace from its W3C `traceparent` header), `w2s.search.step` (one step of
`drive`), `w2s.upstream.call` (one billed upstream call, its retries counted in `w2s.attempt`) and
`w2s.scoring` (the scorer call of one upstream request's candidates).

Only the OpenTelemetry *API* is used here, as a library should: whoever runs the process picks
the SDK, the exporter and the provider (`opentelemetry-instrument`, their own set-up, or
`w2s serve --otel`, which is `export_otlp` below). `use_tracer_provider` hands a provider to this
module alone (tests, `--otel`): the global one can be set only once per process. The core install
has no opentelemetry: then every span is `NO_SPAN` and costs a function call. Attribute names
follow the semantic conventions where one exists (`http.*`, `gen_ai.*`, `error.type`), `w2s.*`
for ours; values are primitives (None values are dropped).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Union

from proxy.config.extras import require
from proxy.types import Usage

try:  # the `otel` extra; the API alone is enough for spans to reach a provider someone else set
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the core install: every span is a no-op
    trace = None

AttributeValue = Union[str, bool, int, float, None]
TRACER_NAME = "w2s-proxy"
SERVICE_NAME = "w2s-proxy"

_provider: Any = None
_tracer: Any = None


def enabled() -> bool:
    """Is the OpenTelemetry API installed (so spans reach whatever provider is set)?"""
    return trace is not None


def use_tracer_provider(provider: Any) -> None:
    """Send this module's spans to `provider` (an SDK TracerProvider) rather than the global one;
    None: back to the global one. The global provider can be set only once per process, so tests
    and `w2s serve --otel` set theirs here."""
    global _provider, _tracer
    _provider, _tracer = provider, None


def _get_tracer() -> Any:
    """The tracer, made once per provider (the global provider's proxy tracer follows a provider
    set later, so caching it is safe)."""
    global _tracer
    if _tracer is None and trace is not None:
        _tracer = trace.get_tracer(TRACER_NAME, tracer_provider=_provider)
    return _tracer


def _clean(attributes: Mapping[str, AttributeValue]) -> dict[str, str | bool | int | float]:
    return {k: v for k, v in attributes.items() if v is not None}


class Span:
    """Our handle on one span: attributes, events, usage, failure. Without opentelemetry (or with
    no span to handle) every method does nothing, so callers never ask whether tracing is on."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Any = None, token: Any = None) -> None:
        self._span = span
        self._token = token

    def set(self, **attributes: AttributeValue) -> None:
        if self._span is not None:
            self._span.set_attributes(_clean(attributes))

    def event(self, name: str, **attributes: AttributeValue) -> None:
        if self._span is not None:
            self._span.add_event(name, _clean(attributes))

    def usage(self, usage: Usage) -> None:
        """What the upstream billed, under the gen_ai names (cache reads and writes included)."""
        self.set(**{"gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                    "gen_ai.usage.cache_read.input_tokens": usage.cached_tokens,
                    "gen_ai.usage.cache_creation.input_tokens": usage.cache_write_tokens})

    def fail(self, exc: BaseException | None = None, description: str | None = None) -> None:
        """Error status; with `exc`, the exception recorded and its kind as `error.type` (an
        UpstreamError's label, `http_503` or `timeout`, else the class name) and, where it has
        one, its HTTP status. Read by duck type: this module imports nothing above proxy.types."""
        if self._span is None:
            return
        if exc is not None:
            self._span.record_exception(exc)
            label = getattr(exc, "label", None)
            status = getattr(exc, "status", None)
            self.set(**{"error.type": label if isinstance(label, str) else type(exc).__name__,
                        "w2s.upstream.error": getattr(exc, "kind", None) if isinstance(label, str) else None,
                        "http.response.status_code": status if isinstance(status, int) else None})
            description = description or type(exc).__name__
        self._span.set_status(Status(StatusCode.ERROR, description))

    def end(self) -> None:
        """End a span started with `start_request` (spans of `span()` end with their block)."""
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        if self._span is not None:
            self._span.end()

    def done(self, status: int) -> None:
        """End the request span with its HTTP status (a 5xx is an error; a 4xx is the client's)."""
        self.set(**{"http.response.status_code": status})
        if status >= 500:
            self.fail(description=f"HTTP {status}")
        self.end()


NO_SPAN = Span()


@contextlib.contextmanager
def _started(name: str, kind: Any, attributes: Mapping[str, AttributeValue]) -> Iterator[Span]:
    tracer = _get_tracer()
    if tracer is None:
        yield NO_SPAN
        return
    with tracer.start_as_current_span(name, kind=kind, attributes=_clean(attributes), record_exception=False,
                                      set_status_on_exception=False) as raw:
        handle = Span(raw)
        try:
            yield handle
        except BaseException as exc:
            handle.fail(exc)
            raise


def span(name: str, /, **attributes: AttributeValue) -> contextlib.AbstractContextManager[Span]:
    """An internal span, current for the block (tasks started in it are its children); an
    exception leaving the block is recorded and sets the error status. Usable in async code: the
    context lives in context variables, which each task copies."""
    return _started(name, SpanKind.INTERNAL if trace is not None else None, attributes)


_upstream_span: ContextVar[Span | None] = ContextVar("w2s_upstream_span", default=None)


@contextlib.contextmanager
def upstream_call(family: str, model: str, n: int | None) -> Iterator[Span]:
    """`w2s.upstream.call` (a client span) around one retried, billed upstream call: the family's
    `kind`, the model, n; the caller adds the usage (`Span.usage`) when it returns; `retried`
    counts attempts on it."""
    attributes = {"w2s.upstream.kind": family, "gen_ai.request.model": model, "gen_ai.request.choice.count": n,
                  "w2s.attempt": 1}
    with _started("w2s.upstream.call", SpanKind.CLIENT if trace is not None else None, attributes) as handle:
        token = _upstream_span.set(handle)
        try:
            yield handle
        finally:
            _upstream_span.reset(token)


def retried(attempt: int, failure: str) -> None:
    """The upstream call in progress failed (`failure`: its kind) and is tried again as `attempt`
    (from 2): an event and the attempt count on its span (nothing outside `upstream_call`)."""
    handle = _upstream_span.get()
    if handle is not None:
        handle.event("w2s.upstream.retry", **{"w2s.attempt": attempt, "error.type": failure})
        handle.set(**{"w2s.attempt": attempt})


def start_request(headers: Mapping[str, str], **attributes: AttributeValue) -> Span:
    """Start `w2s.request` (a server span) as a child of the trace the caller's `traceparent`
    header names (a new trace without one) and make it current until `Span.done(status)`, which
    must run in the same task (the middleware's `finally`, beside its request-id reset)."""
    tracer = _get_tracer()
    if tracer is None:
        return NO_SPAN
    raw = tracer.start_span("w2s.request", context=propagate.extract(headers), kind=SpanKind.SERVER,
                            attributes=_clean(attributes))
    token = otel_context.attach(trace.set_span_in_context(raw))
    return Span(raw, token)


def export_otlp() -> Any:
    """`w2s serve --otel`: an SDK TracerProvider (`service.name` w2s-proxy) exporting in batches
    over OTLP/HTTP to where the standard OTEL_EXPORTER_OTLP_* variables say (the exporter reads
    them; localhost:4318 by default), used by this module. The caller shuts it down (which
    flushes). MissingExtra (naming the `otel` extra) when the SDK or exporter is absent."""
    require("otel", "opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use_tracer_provider(provider)
    return provider
