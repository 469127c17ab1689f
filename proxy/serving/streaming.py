"""Streaming a search as server-sent events: text as soon as it can no longer change.

An algorithm that says so (`SearchAlgorithm.shared_prefix_is_final`; chunk-level beam search
does: every later beam, and so the answer, extends a survivor) makes the common prefix of all
survivors of a step final; anything past it can still be replaced by a sibling's text. For any
other algorithm the text goes out when the search ends. `SettledText` turns that growing prefix into deltas, and
`stream_search` sends them in the endpoint's chunk format, then the rest of the answer when the
search ends, then `[DONE]` (or what else the endpoint frames and ends its streams with:
`Endpoint.framing`, `closing`, `stream_end`). A failure after the 200 went out is reported in-band, as OpenAI does.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from proxy.protocol.requests import SamplingRequest
from proxy.protocol.responses import SearchSummary, new_id, now
from proxy.search import Candidate, SearchResult, StepTrace
from proxy.serving.endpoint import Endpoint, finish_reason, usage_info
from proxy.serving.errors import ApiError, internal_error
from proxy.serving.metrics import FIRST_TOKEN_KEY

log = logging.getLogger("w2s.server")

#: The status of a stream that failed after its 200 went out, for the request metrics.
STREAM_STATUS = web.RequestKey("w2s_stream_status", int)

StepHook = Callable[[StepTrace, list[Candidate]], Awaitable[None]]
#: Runs the search, awaiting the hook after every step; upstream failures, and the server ending
#: the search at shutdown (`server_shutting_down`), raised as ApiError.
SearchRun = Callable[[StepHook], Awaitable[SearchResult]]


def common_prefix(texts: Sequence[str]) -> str:
    """Longest string every text starts with ("" for no texts)."""
    if not texts:
        return ""
    return os.path.commonprefix(list(texts))


class SettledText:
    """Tracks what was sent and returns only the new part of each settled prefix.

    `display` maps the answer so far to what the client sees (e.g. dropping leading spaces for
    chat); it must keep prefixes as prefixes, which `str.lstrip` does.
    """

    def __init__(self, display: Callable[[str], str] = lambda s: s) -> None:
        self._display = display
        self.sent = ""

    def advance(self, settled: str) -> str:
        """The delta to send now that `settled` can no longer change."""
        shown = self._display(settled)
        if not shown.startswith(self.sent):
            # The search's invariant was broken; sending more would corrupt the client's text.
            raise RuntimeError("settled text was contradicted by a later step")
        delta = shown[len(self.sent):]
        self.sent = shown
        return delta


def sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


async def stream_search(request: web.Request, endpoint: Endpoint[Any], req: SamplingRequest, run: SearchRun,
                        summarize: Callable[[SearchResult], SearchSummary],
                        keepalive_s: float = 10.0, settles: bool = True) -> web.StreamResponse:
    """SSE: text as soon as every surviving beam agrees on it (where the algorithm says such
    text is final, `settles`; otherwise all of it at the end), the rest at the end, then [DONE];
    an SSE comment (`: keepalive`) whenever nothing was sent for `keepalive_s` (a step can take
    longer than an idle-timeout proxy waits; clients skip comments)."""
    rid, created = new_id(endpoint.id_prefix), now()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    writing = asyncio.Lock()  # the keepalive and the search never write into each other's event

    async def send(data: bytes) -> None:
        nonlocal last_sent
        async with writing:
            await response.write(data)
            last_sent = loop.time()

    async def keepalive() -> None:
        while True:
            await asyncio.sleep(max(0.0, last_sent + keepalive_s - loop.time()))
            if loop.time() - last_sent >= keepalive_s:
                await send(b": keepalive\n\n")

    frame = endpoint.framing() or sse
    for opening in endpoint.opening(rid, created, req):
        await send(frame(opening))
    settled = SettledText(endpoint.display)

    async def on_step(trace: StepTrace, survivors: list[Candidate]) -> None:
        if not settles:
            return
        delta = settled.advance(common_prefix([s.text for s in survivors]))
        if delta:
            request.setdefault(FIRST_TOKEN_KEY, time.perf_counter())  # the metrics' time to first token
            await send(frame(endpoint.chunk(rid, created, req, delta)))

    beat = asyncio.create_task(keepalive())
    try:
        result = await run(on_step)
    except ConnectionResetError:
        raise
    except Exception as e:  # the status line is gone: report in-band, as OpenAI does
        if not isinstance(e, ApiError):
            log.exception("unhandled error in a streamed search")
        error = e if isinstance(e, ApiError) else internal_error()
        request[STREAM_STATUS] = error.status
        await _stop(beat)
        await response.write(error.sse())
        await response.write_eof()
        return response
    finally:
        await _stop(beat)
    rest = settled.advance(result.text)
    if rest:
        request.setdefault(FIRST_TOKEN_KEY, time.perf_counter())
        await response.write(frame(endpoint.chunk(rid, created, req, rest)))
    for event in endpoint.closing(rid, created, req, settled.sent, finish_reason(result), usage_info(result),
                                  summarize(result)):
        await response.write(frame(event))
    await response.write(endpoint.stream_end)
    await response.write_eof()
    return response


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
