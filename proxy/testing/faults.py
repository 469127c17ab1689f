"""The faults the toy upstream can inject, and the answers they make: what a correct client
must retry (statuses, hangs, cut connections, 200s that are not answers) and what it must accept
as odd but legitimate answers (quirks)."""
from __future__ import annotations

import json

from aiohttp import web

from proxy.serving.errors import ApiError

Fault = int | str

QUIRKS: tuple[str, ...] = ("fewer-choices", "empty-text")
"""Odd answers a correct client accepts as answers (see the module docstring)."""

BAD_ANSWERS: tuple[str, ...] = ("malformed", "truncated", "no-choices", "empty-length")
"""200s whose body is not a usable completion."""

FAULT_KINDS: tuple[Fault, ...] = (429, 500, 503, "hang", "reset", "short-body", *BAD_ANSWERS, *QUIRKS)
"""What `fault_rate` draws from by default: every kind this server can inject."""

_NAMED = frozenset({"hang", "reset", "short-body", *BAD_ANSWERS, *QUIRKS})


def body_key(body: object) -> str:
    """A request body as a canonical string (sorted keys), to recognise the same request again."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def check_fault(fault: Fault) -> Fault:
    if isinstance(fault, bool) or not (isinstance(fault, int) and 400 <= fault <= 599 or fault in _NAMED):
        raise ValueError(f"unknown fault {fault!r}: an HTTP status 400..599 or one of {sorted(_NAMED)}")
    return fault


def status_response(status: int, retry_after_s: float | None) -> web.Response:
    """An OpenAI-shaped error with `status`, saying when to come back where `retry_after_s` is set."""
    type_ = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    headers = None
    if retry_after_s is not None:
        # Fractional seconds are allowed, so tests can ask for short waits: the openai SDK
        # and proxy.upstreams.retry parse floats (and prefer retry-after-ms anyway).
        seconds = float(retry_after_s)
        headers = {"Retry-After": str(int(seconds)) if seconds.is_integer() else repr(seconds),
                   "retry-after-ms": str(round(seconds * 1000))}
    return ApiError(status, f"injected failure: HTTP {status}", type_=type_, headers=headers).response()


def bad_answer(fault: str, model: str) -> web.Response:
    """A 200 that is not a usable completion (one of BAD_ANSWERS)."""
    usage = {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
    if fault == "truncated":
        return web.Response(text='{"id": "cmpl-1", "object": "text_completion", "choices": [{"te',
                            content_type="application/json")
    if fault == "malformed":
        return web.Response(text='{"object": "text_completion", "choices": [{"text": " the", "index": 0,}]}',
                            content_type="application/json")
    if fault == "no-choices":
        return web.json_response({"object": "text_completion", "model": model, "choices": [], "usage": usage})
    if fault == "empty-length":
        return web.json_response({"object": "text_completion", "model": model, "usage": usage, "choices": [
            {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]})
    raise ValueError(f"unknown fault {fault!r}")
