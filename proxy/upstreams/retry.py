"""The one retry policy every upstream call goes through.

Transient failures (rate limits, timeouts, lock conflicts, server errors, dropped
connections, a 200 whose body is malformed or cut short) are retried with exponential backoff and full jitter; a server that says how
long to wait (Retry-After / retry-after-ms) is believed, up to the backoff ceiling times two.
Everything else (bad request, auth, not found) fails at once: retrying cannot fix it.

Whoever makes a call can hear about its retries through `retry_listener`, a context variable
rather than a constructor argument: one upstream serves many callers (every request of a
server, a client, a runner), and the retries belong to the caller whose context made the call.
This module imports nothing of its callers; the server counts retries this way for /metrics.
"""
from __future__ import annotations

import contextlib
import email.utils
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base, wait_exponential_jitter

log = logging.getLogger("w2s.upstream")

RETRY_STATUSES = frozenset({408, 409, 429})

RetryListener = Callable[[BaseException], None]
#: Called with the failure before each retry's wait, in the context of the call being retried.
retry_listener: ContextVar[RetryListener | None] = ContextVar("w2s_retry_listener", default=None)


@contextlib.contextmanager
def retries_reported_to(listener: RetryListener) -> Iterator[None]:
    """Report the retries of every upstream call made inside this block (and tasks it starts)."""
    token = retry_listener.set(listener)
    try:
        yield
    finally:
        retry_listener.reset(token)


def failure_kind(exc: BaseException) -> str:
    """A short, bounded name for an upstream failure (a metrics label): timeout, connection,
    http_<status>, malformed, or the exception's class name."""
    if isinstance(exc, openai.APITimeoutError):  # before its base class, APIConnectionError
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, openai.APIResponseValidationError):
        return "malformed"
    return type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    return False


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait, if it said."""
    response = getattr(exc, "response", None)
    headers: Any = getattr(response, "headers", None)
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
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class wait_retry_after_or_backoff(wait_base):
    """Retry-After when the server gave one, else exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.backoff = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
        self.ceiling = max(maximum * 2, initial)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = retry_after_seconds(exc)
        if asked is not None:
            return min(asked, self.ceiling)
        return self.backoff(retry_state)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    # Only the exception class and status: messages can echo request data.
    status = getattr(exc, "status_code", None)
    log.warning("upstream call failed (%s%s), attempt %d, retrying",
                type(exc).__name__, f" {status}" if status else "", state.attempt_number)
    listener = retry_listener.get()
    if listener is not None and exc is not None:
        try:
            listener(exc)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the retry
            log.exception("retry listener failed")


def retrying(max_attempts: int, initial_s: float, max_s: float) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_retry_after_or_backoff(initial_s, max_s),
        stop=stop_after_attempt(max_attempts),
        before_sleep=_log_retry,
        reraise=True,
    )
