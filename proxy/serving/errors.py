"""Every refusal the server sends, in OpenAI's shape: `{"error": {message, type, param, code}}`.

Handlers raise `ApiError` and the middleware (proxy.serving.app) writes it, so no route builds
an error body by hand. Two translations live here because they decide what a client may learn:
pydantic's complaints become one 400 naming the field the client sent, and an upstream failure
the retry policy gave up on (our `UpstreamError`, whatever the family's SDK) becomes a 502 or 504
that never repeats the upstream's own message (some APIs echo part of the key they were sent).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web
from pydantic import ValidationError

from proxy.protocol.responses import ErrorInfo, ErrorResponse
from proxy.upstreams.errors import UpstreamError

log = logging.getLogger("w2s.server")

# OpenAI's types, which clients map to exception classes (a 401 typed otherwise becomes LiteLLM's
# BadRequestError instead of AuthenticationError).
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
                502: "upstream_error", 504: "upstream_error"}
# Pydantic names the member of a union that failed (`prompt.str`); the client only knows fields.
_UNION_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


class ApiError(Exception):
    """Answered as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers
        self.body = ErrorResponse(error=ErrorInfo(
            message=message, param=param, code=code,
            type=type_ or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")))

    def response(self) -> web.Response:
        return web.Response(text=self.body.model_dump_json(), status=self.status,
                            content_type="application/json", headers=self.headers)

    def sse(self) -> bytes:
        """The error as one server-sent event, for a stream whose 200 already went out."""
        return b"data: " + self.body.model_dump_json().encode() + b"\n\n"


def internal_error() -> ApiError:
    """What an unexpected exception becomes: no detail, which is logged instead."""
    return ApiError(500, "internal server error")


def shutting_down() -> ApiError:
    """What a search the server ended because its shutdown grace period was running out answers:
    a 503, or a stream's error event once its 200 went out. The request itself was fine."""
    return ApiError(503, "The server stopped before this search finished; send it again.",
                    code="server_shutting_down")


def _param(loc: Sequence[int | str]) -> str | None:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    return ".".join(parts) or None


def validation_error(err: ValidationError) -> ApiError:
    """One 400 naming the first bad field, with every complaint about that field."""
    errors = err.errors()
    if errors[0]["type"] == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request.", code="invalid_json")
    param = _param(errors[0]["loc"])
    msgs: list[str] = []
    for e in errors:
        if _param(e["loc"]) == param:
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            if msg not in msgs:
                msgs.append(msg)
    if param is None:
        return ApiError(400, f"The request body must be a JSON object ({'; '.join(msgs)}).")
    return ApiError(400, f"{param}: {' or '.join(msgs)}", param=param, code="invalid_value")


def upstream_error(exc: BaseException) -> ApiError | None:
    """The answer for an upstream failure after retries (502, or 504 for a timeout); None when
    `exc` is not an upstream failure."""
    if not isinstance(exc, UpstreamError):
        return None
    if exc.kind == "unsuitable":  # our words, about what the model cannot do
        return ApiError(502, str(exc), code="upstream_unsuitable")
    if exc.kind == "timeout":
        return ApiError(504, "The upstream did not answer in time (after retries).", code="upstream_timeout")
    if exc.status is not None:
        # The upstream's own message is not passed on: some echo (part of) the key they got.
        log.warning("upstream failed with HTTP %s after retries", exc.status)
        return ApiError(502, f"The upstream failed with HTTP {exc.status} (after retries).", code="upstream_error")
    if exc.kind == "connection":
        return ApiError(502, "The upstream could not be reached (after retries).", code="upstream_error")
    return ApiError(502, "The upstream answered with a malformed completion.", code="upstream_error")
