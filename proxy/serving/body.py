"""Reading a request body the way every server of ours must: whole, in time, within its size, and
decoded here rather than by aiohttp's parser.

aiohttp decodes a compressed body while it parses the request, before any middleware runs, so a
body that fails to decode (or an encoding whose decoder is not installed, br or zstd) would be
answered with aiohttp's own text/plain error instead of OpenAI's shape. Our servers run with
`auto_decompress=False` and decode gzip and deflate here, bounded by the size limit after
decoding too (a small bomb must not become a large body); any other encoding is a 415.
"""
from __future__ import annotations

import asyncio
import zlib

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy.serving.errors import ApiError

DEFAULT_MAX_BYTES = 1 << 20


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"The request body exceeds {max_bytes} bytes.", code="request_too_large")


def _undecodable() -> ApiError:
    return ApiError(400, "The request body could not be decoded as its Content-Encoding says.",
                    code="invalid_encoding")


def decode(raw: bytes, encoding: str, max_bytes: int) -> bytes:
    """`raw` decoded per its Content-Encoding (identity, gzip, deflate), at most `max_bytes`."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":  # zlib-wrapped, as the RFC says; raw deflate as clients often send
        wbits = zlib.MAX_WBITS if raw[:1] and (raw[0] & 0x0F) == 8 else -zlib.MAX_WBITS
    else:
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported here (gzip, deflate or none).",
                       code="unsupported_encoding")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, max_bytes + 1)
    except zlib.error:
        raise _undecodable() from None
    if len(out) > max_bytes:
        raise too_large(max_bytes)
    if not inflater.eof:
        raise _undecodable()
    return out


async def read_body(request: web.Request, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = 30.0) -> bytes:
    """The whole body, decoded; 413 past `max_bytes` (before or after decoding), 408 when it has
    not all arrived within `timeout_s`, 400 when it does not decode."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {timeout_s:g} s.",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(max_bytes) from None
    except RequestPayloadError:
        raise _undecodable() from None
    return decode(raw, request.headers.get("Content-Encoding", ""), max_bytes)
