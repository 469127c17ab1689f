"""The one retry policy every upstream call goes through.

It knows one exception, ours (proxy.upstreams.errors.UpstreamError), which every family raises
from inside the retried call. Transient failures (rate limits, timeouts, lock conflicts, server
errors, dropped connections, a 200 whose body is malformed or cut short: `retryable`) are
retried with exponential backoff and full jitter; a server that says how long to wait
(Retry-After / retry-after-ms, read by the family into `retry_after`) is believed, up to the
backoff ceiling times two. Everything else (bad request, auth, not found, an unsuitable model)
fails at once: retrying cannot fix it.

Whoever makes a call can hear about its retries through `retry_listener`, a context variable
rather than a constructor argument: one upstream serves many callers (every request of a
server, a client, a runner), and the retries belong to the caller whose context made the call.
This module imports nothing of its callers; the server counts retries this way for /metrics.
Each retry is also an event on the call's `w2s.upstream.call` span (proxy.tracing), if any.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base, wait_exponential_jitter

from proxy import tracing
from proxy.upstreams.errors import UpstreamError

log = logging.getLogger("w2s.upstream")

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
    http_<status>, malformed, unsuitable; for anything that is not an UpstreamError, its class name."""
    return exc.label if isinstance(exc, UpstreamError) else type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait, if it said."""
    return exc.retry_after if isinstance(exc, UpstreamError) else None


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
    # Only the failure's kind: an upstream's messages can echo request data.
    log.warning("upstream call failed (%s), attempt %d, retrying",
                failure_kind(exc) if exc is not None else "?", state.attempt_number)
    tracing.retried(state.attempt_number + 1, failure_kind(exc) if exc is not None else "?")
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
