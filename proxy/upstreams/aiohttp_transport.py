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
import urllib.request

import aiohttp
import httpx2
import yarl


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
        # HTTP(S)_PROXY / NO_PROXY are honoured, as by the SDK's default transport, but read once
        # here and decided once per host: aiohttp's trust_env re-reads them (and ~/.netrc) on
        # every request, which cost about 0.5 ms of CPU per upstream call.
        self._env_proxies = urllib.request.getproxies()
        self._proxies: dict[tuple[str, str], tuple[str | None, aiohttp.BasicAuth | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=self.keepalive_s,
                                             ssl=self._ssl)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
            self._loop = loop
        return self._session

    def _proxy_for(self, url: httpx2.URL) -> tuple[str | None, aiohttp.BasicAuth | None]:
        key = (url.scheme, url.host)
        if key not in self._proxies:
            proxy = self._env_proxies.get(url.scheme)
            if proxy is None or urllib.request.proxy_bypass(url.host):
                self._proxies[key] = (None, None)
            else:  # credentials in the proxy URL become its auth, as aiohttp's trust_env does
                self._proxies[key] = (proxy, aiohttp.BasicAuth.from_url(yarl.URL(proxy)))
        return self._proxies[key]

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeout = request.extensions.get("timeout", {})
        session = self._session_for_loop()
        proxy, proxy_auth = self._proxy_for(request.url)
        body = await request.aread()
        try:
            async with session.request(
                request.method, str(request.url), headers=list(request.headers.multi_items()),
                data=body or None, allow_redirects=False, compress=False, proxy=proxy, proxy_auth=proxy_auth,
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
