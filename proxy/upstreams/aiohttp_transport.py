"""The HTTP transport under our `openai.AsyncOpenAI` client: aiohttp instead of httpx2's own pool.

Why not the SDK's default: at 64 concurrent guided requests (100+ upstream calls in flight)
httpcore's connection pool rescans every connection on each request, and the upstream calls
became the server's main CPU cost (benchmarks/server.py). aiohttp's connector is O(1) per
request. Why not `openai.DefaultAioHttpClient`: it reports a refused connection as a
*timeout* (its error map picks the first matching aiohttp base class), which would turn a dead
upstream's 502 into a 504 and retry it as if it were slow.

The SDK keeps doing everything else (auth headers, status errors, request building); this
module only moves bytes. Completions are not streamed upstream, so each body is read whole
before the response is handed back; aiohttp leaves the encoding to httpx2, which decodes it.
"""
from __future__ import annotations

import asyncio

import aiohttp
import httpx2


def _mapped(exc: aiohttp.ClientError | asyncio.TimeoutError) -> httpx2.TransportError:
    """The httpx2 error the SDK expects: timeouts become APITimeoutError, the rest APIConnectionError."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx2.ConnectTimeout(str(exc) or "connect timeout")
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's socket/read timeouts are TimeoutErrors too
        return httpx2.ReadTimeout(str(exc) or "read timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx2.ConnectError(str(exc))
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return httpx2.RemoteProtocolError(str(exc) or type(exc).__name__)
    return httpx2.ReadError(str(exc) or type(exc).__name__)


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """One aiohttp session per event loop, created on first use (aiohttp binds sessions to a loop)."""

    def __init__(self, max_connections: int = 0, keepalive_s: float = 30.0) -> None:
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        # The trust the SDK's own transport would use (system store, SSL_CERT_FILE / _DIR).
        self._ssl = httpx2.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=self.keepalive_s,
                                             ssl=self._ssl)
            # trust_env: HTTP(S)_PROXY / NO_PROXY are honoured, as by the SDK's default transport.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=True,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
            self._loop = loop
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeout = request.extensions.get("timeout", {})
        session = self._session_for_loop()
        body = await request.aread()
        try:
            async with session.request(
                request.method, str(request.url), headers=list(request.headers.multi_items()),
                data=body or None, allow_redirects=False, compress=False,
                timeout=aiohttp.ClientTimeout(connect=timeout.get("pool"), sock_connect=timeout.get("connect"),
                                              sock_read=timeout.get("read")),
            ) as resp:
                content = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _mapped(e) from e
        return httpx2.Response(status_code=resp.status, headers=resp.raw_headers, content=content,
                               request=request, extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
