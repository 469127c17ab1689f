"""Proxy keys for `/v1/*`: `Authorization: Bearer <key>` against the keys the operator set.

Kept apart so the one security-sensitive comparison is easy to audit: keys are compared as
fixed-length digests, in constant time, and every key is tried, so neither the key's length
nor which key matched shows in the response time.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from aiohttp import web

from proxy.serving.errors import ApiError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """No keys: every request passes. Otherwise a request must carry one of them."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, request: web.Request) -> int | None:
        """Raise a 401 unless the request carries a valid key (or no keys are set); return which
        key (its index among the operator's keys; None when there are none), never the key."""
        if not self._digests:
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        matched: int | None = None
        if scheme.lower() == "bearer" and given:
            digest = _digest(given.strip())
            for i, d in enumerate(self._digests):  # no early exit: the time does not tell which key matched
                if hmac.compare_digest(digest, d):
                    matched = i
        if matched is None:
            raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")
        return matched
