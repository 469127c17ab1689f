"""The one retry policy every upstream call goes through.

Transient failures (rate limits, timeouts, lock conflicts, server errors, dropped
connections) are retried with exponential backoff and full jitter; a server that says how
long to wait (Retry-After / retry-after-ms) is believed, up to the backoff ceiling times two.
Everything else (bad request, auth, not found) fails at once: retrying cannot fix it.
"""
from __future__ import annotations

import email.utils
import logging
import time
from typing import Any

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base, wait_exponential_jitter

log = logging.getLogger("w2s.upstream")

RETRY_STATUSES = frozenset({408, 409, 429})


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
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


def retrying(max_attempts: int, initial_s: float, max_s: float) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_retry_after_or_backoff(initial_s, max_s),
        stop=stop_after_attempt(max_attempts),
        before_sleep=_log_retry,
        reraise=True,
    )
