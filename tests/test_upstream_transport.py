"""The aiohttp transport under the openai SDK: errors keep their meaning, bodies arrive intact."""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx2
import pytest
from aiohttp import web

from proxy.config import AppConfig, SearchConfig
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.serving.app import GuidanceServer
from proxy.types import SamplingParams
from proxy.upstreams.aiohttp_transport import AiohttpTransport, _mapped
from proxy.upstreams.errors import UpstreamError
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import on_any_port, upstream_config

COMPLETION = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "text": " naïve café 🙂", "finish_reason": "stop", "logprobs": None}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


@asynccontextmanager
async def raw_server(handler: Any) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 answering POST /v1/completions with `handler`."""
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def upstream_at(base_url: str) -> OpenAICompletionsUpstream:
    return OpenAICompletionsUpstream(upstream_config(ToyCompletionsServer(), base_url=base_url,
                                                     max_attempts=1))


async def test_a_gzip_body_is_decoded_once() -> None:
    seen: list[str] = []

    async def gzipped(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        return web.Response(body=gzip.compress(json.dumps(COMPLETION).encode()),
                            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async with raw_server(gzipped) as url, upstream_at(url) as up:
        res = await up.sample_prompt("P", SamplingParams(n=1, max_tokens=5))
    assert "gzip" in seen[0]  # httpx2 says what it can decode; aiohttp adds nothing of its own
    assert [(c.text, c.num_tokens, c.finished) for c in res.continuations] == [(" naïve café 🙂", 5, True)]


async def test_a_malformed_completion_is_an_error_naming_it_and_a_502_at_the_server(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="w2s.upstream")

    asked = 0

    async def malformed(request: web.Request) -> web.Response:
        nonlocal asked
        asked += 1
        return web.json_response({"id": "c", "choices": [{"index": 0}]})  # no text

    async with raw_server(malformed) as url:
        async with upstream_at(url) as up:  # one attempt
            with pytest.raises(UpstreamError, match="malformed"):
                await up.sample_prompt("P", SamplingParams(n=1, max_tokens=5))
        cfg = AppConfig(upstream=upstream_config(ToyCompletionsServer(), base_url=url, max_attempts=3),
                        search=SearchConfig())
        async with GuidanceServer(on_any_port(cfg), shutdown_timeout_s=0.5) as server:
            async with aiohttp.ClientSession() as s:
                async with s.post(server.base_url + "/completions", json={"model": "toy-instruct", "prompt": "x"}) as r:
                    status, body = r.status, await r.json()
    assert status == 502 and body["error"]["message"] == "The upstream answered with a malformed completion."
    assert asked == 1 + 3  # a malformed 200 is retried like a 5xx (one body may be cut short), then given up on
    assert caplog.text.count("retrying") == 2


@pytest.mark.parametrize(("exc", "mapped", "sdk_error"), [
    (aiohttp.ConnectionTimeoutError("connect"), httpx2.ConnectTimeout, "APITimeoutError"),
    (aiohttp.SocketTimeoutError("read"), httpx2.ReadTimeout, "APITimeoutError"),
    (asyncio.TimeoutError(), httpx2.ReadTimeout, "APITimeoutError"),
    (aiohttp.ServerDisconnectedError(), httpx2.RemoteProtocolError, "APIConnectionError"),
    (aiohttp.ClientPayloadError("truncated"), httpx2.RemoteProtocolError, "APIConnectionError"),
    (aiohttp.ClientOSError(104, "reset"), httpx2.ReadError, "APIConnectionError"),
])
def test_aiohttp_errors_map_to_what_the_sdk_retries_as_intended(exc: Exception, mapped: type, sdk_error: str) -> None:
    out = _mapped(exc)  # type: ignore[arg-type]
    assert type(out) is mapped
    # The SDK turns httpx2 timeouts into APITimeoutError (a 504 at our server), other transport errors
    # into APIConnectionError (a 502).
    assert isinstance(out, httpx2.TimeoutException) == (sdk_error == "APITimeoutError")
    assert isinstance(out, httpx2.RequestError)


async def test_a_refused_connection_is_a_connect_error_not_a_timeout() -> None:
    async with ToyCompletionsServer() as closed:
        dead = closed.base_url
    transport = AiohttpTransport()
    try:
        with pytest.raises(httpx2.ConnectError):
            await transport.handle_async_request(httpx2.Request("POST", dead + "/completions", json={}))
    finally:
        await transport.aclose()


async def test_one_transport_serves_successive_event_loops() -> None:
    """aiohttp sessions belong to one loop; a client reused under a new loop gets a new session."""
    async with ToyCompletionsServer() as server:
        transport = AiohttpTransport()

        def call() -> int:
            async def once() -> int:
                r = await transport.handle_async_request(httpx2.Request("GET", server.base_url + "/models"))
                return r.status_code
            return asyncio.run(once())

        assert await asyncio.to_thread(call) == 200
        assert await asyncio.to_thread(call) == 200  # the first loop is closed by now
        await transport.aclose()


async def test_http_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """As with the SDK's default transport: HTTP(S)_PROXY is honoured (here a proxy on 127.0.0.1
    answers itself; the upstream's own name is never resolved)."""
    seen: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        return web.json_response(COMPLETION)

    async with raw_server(proxy) as proxy_url:
        for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy_url.removesuffix("/v1"))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # a hosted base URL needs its key
        async with upstream_at("http://upstream.invalid/v1") as up:
            res = await up.sample_prompt("P", SamplingParams(n=1, max_tokens=5))
    assert seen == ["http://upstream.invalid/v1/completions"]
    assert res.continuations[0].text == " naïve café 🙂"


def test_proxy_settings_are_read_once_and_no_proxy_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://user:pw@127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "direct.example")
    transport = AiohttpTransport()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # later changes do not reach a made transport
    proxy, auth = transport._proxy_for(httpx2.URL("http://api.example/v1/completions"))
    assert proxy == "http://user:pw@127.0.0.1:3128" and auth is not None and (auth.login, auth.password) == ("user", "pw")
    assert transport._proxy_for(httpx2.URL("http://direct.example/v1")) == (None, None)
    assert transport._proxy_for(httpx2.URL("https://api.example/v1")) == (None, None)  # no HTTPS_PROXY set
