"""Our own upstream failure: what every family's SDK errors become at the family's edge.

A family translates its SDK's exceptions into `UpstreamError` where it calls the SDK (inside the
retried function, so the retry policy sees ours), and everything above the families (the retry
policy, the server's 502 / 504, the metrics, readiness, the CLI and the runners) knows only this
class. Its message is always ours: an upstream's own message is never kept in it (some APIs
echo part of the key they were sent), so it may be shown to a client and logged.

    timeout     no answer in time
    connection  not reached, or the connection dropped before an answer
    http        an error status (`status`; `retry_after` when the server said how long to wait)
    malformed   a 200 that is not a usable answer (cut short, not JSON, no choices)
    unsuitable  the upstream cannot do what guided search needs (a model that refuses to continue
                a partial answer): never retried, and the message says why
"""
from __future__ import annotations

import email.utils
import time
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from proxy.types import Probe

UpstreamErrorKind = Literal["timeout", "connection", "http", "malformed", "unsuitable"]

RETRY_STATUSES = frozenset({408, 409, 429})
"""Statuses worth another try besides 5xx: timeout, lock conflict, rate limit."""

_SAID = {"timeout": "the upstream did not answer in time", "connection": "the upstream could not be reached"}


def retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


class UpstreamError(Exception):
    """An upstream call that failed, in our words. `retryable` defaults to what the kind and status
    say (timeouts, connection errors, malformed answers, 408, 409, 429 and 5xx); `refused` names
    the request fields a client error complained about ("n", "prompt"), as the family read them
    from the upstream's answer, so it can fall back without keeping that answer."""

    def __init__(self, kind: UpstreamErrorKind, message: str | None = None, *, status: int | None = None,
                 retry_after: float | None = None, retryable: bool | None = None,
                 refused: Iterable[str] = ()) -> None:
        if message is None:
            message = f"the upstream answered HTTP {status}" if status is not None else _SAID.get(kind, kind)
        super().__init__(message)
        self.kind: UpstreamErrorKind = kind
        self.status = status
        self.retry_after = retry_after
        self.refused = frozenset(refused)
        if retryable is None:
            retryable = (kind in ("timeout", "connection", "malformed")
                         or (kind == "http" and status is not None and retryable_status(status)))
        self.retryable = retryable

    @property
    def label(self) -> str:
        """A short, bounded name (metrics, logs): http_<status> when the upstream answered with
        an error status, else the kind."""
        return f"http_{self.status}" if self.status is not None else self.kind

    @property
    def url(self) -> str | None:
        """The URL the failed request went to, read from the SDK error it was made from (its
        `__cause__`), without credentials or query: what a connection error names. None when
        the cause does not say."""
        request = getattr(self.__cause__, "request", None)
        try:
            raw = getattr(request, "url", None)
        except RuntimeError:  # httpx: an error made without a request
            return None
        return None if raw is None else public_url(str(raw))

    def __repr__(self) -> str:
        return f"UpstreamError({self.label}: {self})"


def public_url(url: str) -> str:
    """`url` fit to show: no user, password, query or fragment (a key may ride in any of them)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def malformed(problem: str) -> UpstreamError:
    """A 200 that is not a usable answer (retried, like a 5xx)."""
    return UpstreamError("malformed", f"the upstream's answer is malformed: {problem}")


def retry_after_from(headers: Any) -> float | None:
    """Seconds a response's headers ask us to wait (retry-after-ms, else Retry-After in seconds
    or as an HTTP date), if they say."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, parsed.timestamp() - time.time())


# The words readiness has always reported for an unreachable upstream (they were the openai SDK's
# class names), kept so that whatever watches /health still matches them.
_UNREACHABLE = {"connection": "APIConnectionError", "timeout": "APITimeoutError"}


def probe_failure(exc: UpstreamError) -> Probe:
    """Why a readiness probe failed, in the words every family uses."""
    if exc.status is not None:
        return Probe("refused", f"HTTP {exc.status}")
    if exc.kind in _UNREACHABLE:
        return Probe("unreachable", _UNREACHABLE[exc.kind])
    return Probe("failed", exc.kind)
