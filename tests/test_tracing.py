"""OpenTelemetry spans through the real server: a guided and a plain request from the real openai
client to a GuidanceServer over the toy upstream, the spans caught by the SDK's in-memory
exporter, and checked against what the response itself reports (steps, calls, usage). Also: a
caller's `traceparent` is continued, a failing upstream leaves an error span, and without
opentelemetry every span is a no-op that still works."""
from __future__ import annotations

import importlib
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from proxy import tracing  # noqa: E402
from proxy.config import AppConfig, SearchConfig, ServerConfig  # noqa: E402
from proxy.config.extras import MissingExtra  # noqa: E402
from proxy.serving.app import GuidanceServer  # noqa: E402
from proxy.testing.toy_server import ToyCompletionsServer  # noqa: E402
from proxy.types import Usage  # noqa: E402
from tests.conftest import on_any_port, upstream_config  # noqa: E402
from tests.doubles import FnScorer  # noqa: E402

MODEL = "toy-instruct"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def distinct_words(text: str, finished: bool) -> float:
    return float(len(set(text.split()))) + (1.0 if finished else 0.0)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Our spans into memory, through a provider handed to proxy.tracing alone (the global one
    can be set only once per process)."""
    caught = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(caught))
    tracing.use_tracer_provider(provider)
    yield caught
    tracing.use_tracer_provider(None)
    provider.shutdown()


@asynccontextmanager
async def served(upstream: ToyCompletionsServer, **kw: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    cfg = AppConfig(upstream=upstream_config(upstream, **kw), search=SearchConfig(), server=ServerConfig())
    async with GuidanceServer(on_any_port(cfg), scorer=FnScorer(distinct_words), shutdown_timeout_s=0.5) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        try:
            yield client
        finally:
            await client.close()


class Tree:
    """The finished spans of one test, by name and by parent."""

    def __init__(self, spans: tuple[ReadableSpan, ...]) -> None:
        self.spans = list(spans)
        self.by_id = {s.context.span_id: s for s in self.spans}

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def parent(self, s: ReadableSpan) -> ReadableSpan | None:
        return self.by_id.get(s.parent.span_id) if s.parent is not None else None

    def under(self, s: ReadableSpan, ancestor: ReadableSpan) -> bool:
        up = self.parent(s)
        while up is not None:
            if up is ancestor:
                return True
            up = self.parent(up)
        return False


def total(spans: list[ReadableSpan], key: str) -> int:
    return sum(int(s.attributes[key]) for s in spans)


async def test_a_guided_request_is_one_trace_of_steps_upstream_calls_and_scoring(
        loopback: ToyCompletionsServer, exporter: InMemorySpanExporter) -> None:
    async with served(loopback) as client:
        raw = await client.completions.with_raw_response.create(
            model=f"{MODEL}+cbs-w2k2l30", prompt="The cat", max_tokens=14, seed=3, extra_body={"w2s": {"l": 8}})
    r = raw.parse()
    w2s = r.model_extra["w2s"]
    tree = Tree(exporter.get_finished_spans())
    (request,) = tree.named("w2s.request")
    assert request.parent is None and request.kind == SpanKind.SERVER
    assert dict(request.attributes) == {"http.request.method": "POST", "http.route": "/v1/completions",
                                        "w2s.request_id": raw.headers["x-request-id"],
                                        "gen_ai.request.model": f"{MODEL}+cbs-w2k2l30",
                                        "http.response.status_code": 200}
    assert request.status.status_code != StatusCode.ERROR
    steps = tree.named("w2s.search.step")
    assert len(steps) == w2s["steps"] >= 2
    assert all(tree.parent(s) is request for s in steps)
    assert sorted(s.attributes["w2s.step"] for s in steps) == list(range(1, w2s["steps"] + 1))
    assert all(s.attributes["w2s.mode"] == w2s["mode"] for s in steps)
    assert steps[0].attributes["w2s.beams"] == 1 and steps[0].attributes["w2s.candidates"] == 4  # W*K of the prompt
    calls = tree.named("w2s.upstream.call")
    assert len(calls) == w2s["upstream_calls"] and all(tree.parent(c) in steps for c in calls)
    assert all(c.kind == SpanKind.CLIENT and c.attributes["w2s.upstream.kind"] == "openai-completions"
               and c.attributes["gen_ai.request.model"] == MODEL and c.attributes["w2s.attempt"] == 1 for c in calls)
    assert r.usage is not None
    assert total(calls, "gen_ai.usage.input_tokens") == r.usage.prompt_tokens
    assert total(calls, "gen_ai.usage.output_tokens") == r.usage.completion_tokens
    assert total(steps, "gen_ai.usage.input_tokens") == r.usage.prompt_tokens  # each step's own usage
    scoring = tree.named("w2s.scoring")
    assert scoring and all(tree.parent(s) in steps for s in scoring)
    assert total(scoring, "w2s.candidates") == total(steps, "w2s.candidates")
    assert {s.context.trace_id for s in tree.spans} == {request.context.trace_id}


async def test_a_plain_request_has_no_scoring_and_continues_the_callers_trace(
        loopback: ToyCompletionsServer, exporter: InMemorySpanExporter) -> None:
    async with served(loopback) as client:
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a pet."}], max_completion_tokens=10, seed=1,
            extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    tree = Tree(exporter.get_finished_spans())
    (request,) = tree.named("w2s.request")
    assert request.context.trace_id == int(TRACE_ID, 16)
    assert request.parent is not None and request.parent.span_id == int(PARENT_ID, 16) and request.parent.is_remote
    assert request.attributes["http.route"] == "/v1/chat/completions"
    assert not tree.named("w2s.scoring")
    steps = tree.named("w2s.search.step")
    assert len(steps) == r.model_extra["w2s"]["steps"] and all(tree.parent(s) is request for s in steps)
    calls = tree.named("w2s.upstream.call")
    assert calls and all(tree.under(c, request) for c in calls)
    assert r.usage is not None and total(calls, "gen_ai.usage.input_tokens") == r.usage.prompt_tokens
    assert total(calls, "gen_ai.usage.output_tokens") == r.usage.completion_tokens
    assert {s.context.trace_id for s in tree.spans} == {int(TRACE_ID, 16)}


async def test_retries_are_counted_on_the_call_and_a_failed_call_is_an_error(exporter: InMemorySpanExporter) -> None:
    async with ToyCompletionsServer(failures=[503]) as upstream:
        async with served(upstream, max_attempts=2) as client:
            r = await client.completions.create(model=MODEL, prompt="A", max_tokens=4, seed=1)  # 503, then an answer
            assert r.choices
            upstream.failures.extend([500, 500])
            with pytest.raises(openai.APIStatusError) as failed:  # 500 twice: out of attempts
                await client.completions.create(model=MODEL, prompt="B", max_tokens=4, seed=1)
    assert failed.value.status_code == 502
    tree = Tree(exporter.get_finished_spans())
    ok, bad = sorted(tree.named("w2s.upstream.call"), key=lambda s: s.start_time or 0)
    assert ok.attributes["w2s.attempt"] == 2 and ok.status.status_code != StatusCode.ERROR
    assert [(e.name, e.attributes["error.type"]) for e in ok.events] == [("w2s.upstream.retry", "http_503")]
    assert bad.status.status_code == StatusCode.ERROR and bad.attributes["w2s.attempt"] == 2
    assert (bad.attributes["error.type"], bad.attributes["w2s.upstream.error"],
            bad.attributes["http.response.status_code"]) == ("http_500", "http", 500)
    assert any(e.name == "exception" for e in bad.events)
    requests = {s.attributes["http.response.status_code"]: s for s in tree.named("w2s.request")}
    assert set(requests) == {200, 502} and requests[502].status.status_code == StatusCode.ERROR
    assert tree.under(bad, requests[502])


def test_without_opentelemetry_every_span_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "opentelemetry", None)  # `import opentelemetry` now fails, as in the core install
            light = importlib.reload(tracing)
            assert not light.enabled()
            with light.span("w2s.search.step", **{"w2s.step": 1}) as s:
                s.set(**{"w2s.beams": 2})
                s.usage(Usage(3, 4))
                s.event("x")
            request = light.start_request({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}, **{"http.route": "/"})
            request.done(500)
            with pytest.raises(ValueError), light.upstream_call("openai-completions", MODEL, 1):
                light.retried(2, "http_503")
                raise ValueError("still raised")
    finally:
        importlib.reload(tracing)
    assert tracing.enabled()


def test_export_needs_the_otel_extra_and_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        provider = tracing.export_otlp()  # builds the exporter; nothing is sent until a span ends
        assert provider.resource.attributes["service.name"] == "w2s-proxy"
        provider.shutdown()
    finally:
        tracing.use_tracer_provider(None)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http", None)
    with pytest.raises(MissingExtra, match=r"w2s-proxy\[otel\]"):
        tracing.export_otlp()
    assert ServerConfig(otel=True).otel


async def test_a_forwarded_stream_is_one_upstream_span_with_its_usage(exporter: InMemorySpanExporter) -> None:
    """Plain-mode passthrough (proxy.serving.passthrough): the stream's call lasts as long as its relay."""
    from tests.test_passthrough import ASK, TOOLS, proxied

    async with proxied() as (fake, _, client):
        stream = await client.chat.completions.create(model="upstream-model", messages=ASK, tools=TOOLS,
                                                      stream=True, max_tokens=6)
        assert [c async for c in stream]
    calls = [s for s in exporter.get_finished_spans() if s.name == "w2s.upstream.call"]
    billed = fake.responses[-1]["usage"]
    assert len(calls) == 1 and calls[0].attributes is not None
    assert calls[0].attributes["gen_ai.usage.output_tokens"] == billed["completion_tokens"]
    assert not [s for s in exporter.get_finished_spans() if s.name in ("w2s.search.step", "w2s.scoring")]
