"""Plain-mode chat requests that only the upstream can honour, forwarded to a chat upstream as
they are, so the proxy can sit in front of all of a user's traffic: an agent's tool calls and
tool results, structured output, logprobs, n > 1, images.

Guided search writes text by sampling chunks and ranking them, so these stay a 400 naming the
field in a guided mode (proxy.protocol.requests). In plain mode there is no search to break:
a request using any of them (`upstream_features`) goes to the upstream when it is a chat family
(`openai-chat`: the body is already in its format) and `server.passthrough` is on (the default).

What changes on the way: `model` becomes the upstream's model (and the client's name again in
the answer); `w2s` is dropped; a stream asks for its usage (`stream_options.include_usage`),
which the client sees only if it asked too. The rest goes as sent: the upstream validates it,
and its refusal of a client's field (400, 413, 422) reaches the client with the upstream's own
message, scrubbed of anything like a key; every other failure is the 502 / 504 a search gets.
A forwarded request is admitted as a search is (concurrency, the key's budget not spent) and its
key is charged what the upstream billed; the metrics count it under mode "forwarded". The
response cache (`response_cache_dir`) does not apply: it holds seeded continuations, not bodies.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from proxy import tracing
from proxy.budget import Budget
from proxy.config import Prices
from proxy.cost import cost_usd
from proxy.serving.errors import ApiError, upstream_error
from proxy.serving.metrics import FIRST_TOKEN_KEY, FORWARDED_MODE, ServerMetrics
from proxy.serving.streaming import STREAM_STATUS
from proxy.types import Usage
from proxy.upstreams.base import Upstream
from proxy.upstreams.errors import UpstreamError
from proxy.upstreams.openai_chat import OpenAIChatUpstream, refusal_of
from proxy.upstreams.openai_http import usage_of

_KEYLIKE = re.compile(r"\b(?:sk|pk|rk|key|api[-_]?key)[-_][A-Za-z0-9._*-]{6,}", re.IGNORECASE)


def chat_upstream(upstream: Upstream) -> OpenAIChatUpstream | None:
    """The chat family under any wrapper (the response cache), or None when it is another family."""
    while not isinstance(upstream, OpenAIChatUpstream):
        inner = getattr(upstream, "inner", None)
        if not isinstance(inner, Upstream):
            return None
        upstream = inner
    return upstream


def scrubbed(text: str, secrets: Iterable[str]) -> str:
    """`text` without the secrets, any 8 characters in a row of one, or words shaped like a key."""
    for secret in secrets:
        for start in range(max(0, len(secret) - 7)):
            piece = secret[start:start + 8]
            if len(piece) == 8 and piece in text:
                text = re.sub(rf"\S*{re.escape(piece)}\S*", "[redacted]", text)
    return _KEYLIKE.sub("[redacted]", text)


class Passthrough:
    """Forwards plain-mode requests to `upstream` and answers with what it said."""

    def __init__(self, upstream: OpenAIChatUpstream, metrics: ServerMetrics, prices: Prices,
                 secrets: Iterable[str]) -> None:
        self.upstream, self.metrics, self.prices = upstream, metrics, prices
        self._secrets = [s for s in secrets if len(s) >= 8]

    async def handle(self, request: web.Request, body: dict[str, Any], budget: Budget | None) -> web.StreamResponse:
        client_model = body["model"]
        sent = {k: v for k, v in body.items() if k != "w2s"} | {"model": self.upstream.cfg.model}
        if body.get("stream"):  # a stream's call lasts as long as its relay: its span too
            with tracing.upstream_call(self.upstream.cfg.kind, self.upstream.cfg.model, body.get("n", 1)) as span:
                return await self._stream(request, sent, client_model, budget, span)
        try:
            answer = await self.upstream.forward(sent)
        except UpstreamError as e:
            self.metrics.search_done(FORWARDED_MODE, "error")
            raise self._error(e) from None
        self._bill(usage_of(answer.usage), budget, "finished")
        return web.json_response({**answer.body, "model": client_model})

    async def _stream(self, request: web.Request, sent: dict[str, Any], client_model: str,
                      budget: Budget | None, span: tracing.Span) -> web.StreamResponse:
        options = sent.get("stream_options") if isinstance(sent.get("stream_options"), dict) else {}
        include_usage = bool(options.get("include_usage"))
        sent["stream_options"] = {**options, "include_usage": True}
        try:
            stream = await self.upstream.open_stream(sent)
        except UpstreamError as e:
            self.metrics.search_done(FORWARDED_MODE, "error")
            raise self._error(e) from None
        outcome = "error"
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                   "X-Accel-Buffering": "no"})
            await response.prepare(request)
            try:
                async for chunk in stream.chunks():
                    if not include_usage:
                        chunk.pop("usage", None)
                        if not chunk.get("choices"):
                            continue
                    if any(_says_something(choice) for choice in chunk.get("choices") or []):
                        request.setdefault(FIRST_TOKEN_KEY, time.perf_counter())  # the metrics' TTFT
                    await response.write(b"data: " + _json({**chunk, "model": client_model}) + b"\n\n")
            except UpstreamError as e:  # the status line is gone: in-band, as OpenAI does
                span.fail(e)
                error = self._error(e)
                request[STREAM_STATUS] = error.status
                await response.write(error.sse())
                await response.write_eof()
                return response
            outcome = "finished"
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except BaseException:  # the client went away (a reset write, or the handler cancelled)
            outcome = "cancelled"
            raise
        finally:
            await stream.aclose()
            span.usage(stream.usage)
            self._bill(stream.usage, budget, outcome)

    def _bill(self, usage: Usage, budget: Budget | None, outcome: str) -> None:
        if budget is not None:
            budget.charge(usage)
        self.metrics.observe_usage(usage, 1, cost_usd(usage, self.prices), FORWARDED_MODE)
        self.metrics.search_done(FORWARDED_MODE, outcome)

    def _error(self, exc: UpstreamError) -> ApiError:
        refusal = refusal_of(exc)
        if refusal is not None and exc.status is not None:
            message, param = refusal
            return ApiError(exc.status, f"The upstream refused the request: {scrubbed(message, self._secrets)}",
                            param=param, code="upstream_refused")
        self.metrics.upstream_failed(exc)
        return upstream_error(exc) or ApiError(502, "The upstream failed.", code="upstream_error")


def _says_something(choice: Any) -> bool:
    """A streamed choice carrying text or a tool call (not only the role, or the finish reason)."""
    delta = choice.get("delta") if isinstance(choice, dict) else None
    return isinstance(delta, dict) and bool(delta.get("content") or delta.get("tool_calls"))


def _json(chunk: dict[str, Any]) -> bytes:
    return json.dumps(chunk, separators=(",", ":")).encode()
