"""Requests aiohttp refuses before any handler runs (a malformed head, an unknown `Expect`, a
`Transfer-Encoding` it cannot take) are answered in OpenAI's shape with their 4xx, and leave no
ERROR traceback in the log: they come before authentication, so anyone could flood it."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from proxy.testing.toy_server import ToyCompletionsServer
from tests.doubles import FnScorer
from tests.test_server import app_config, distinct_words, served

HEAD = b"Host: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
CASES = {
    "expect-bogus": (b"POST /v1/completions HTTP/1.1\r\n" + HEAD + b"Expect: 999-bogus\r\nContent-Length: 2\r\n\r\n{}",
                     417),
    "expect-bogus-unknown-route": (b"POST /nowhere HTTP/1.1\r\n" + HEAD + b"Expect: 999-bogus\r\n"
                                   b"Content-Length: 2\r\n\r\n{}", 417),
    "transfer-encoding-gzip": (b"POST /v1/completions HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: gzip\r\n\r\n{}",
                               400),
    "bad-content-length": (b"POST /v1/completions HTTP/1.1\r\n" + HEAD + b"Content-Length: -5\r\n\r\n{}", 400),
    "header-without-colon": (b"GET /health HTTP/1.1\r\n" + HEAD + b"no colon here\r\n\r\n", 400),
}


async def exchange(url: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    assert status == expected
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_malformed_http_gets_an_openai_error_and_no_traceback(case: str, caplog: pytest.LogCaptureFixture,
                                                                    loopback: ToyCompletionsServer) -> None:
    raw, expected = CASES[case]
    caplog.set_level(logging.DEBUG)
    async with served(app_config(loopback),
                      scorer=FnScorer(distinct_words)) as (srv, _):
        status, headers, body = await exchange(srv.base_url, raw)
        assert_openai_error(status, headers, body, expected)
        # the server still answers well-formed requests afterwards
        ok, _, _ = await exchange(srv.base_url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not any(b"bogus" in r.getMessage().encode() or r.exc_info for r in caplog.records
                   if r.levelno >= logging.WARNING)


async def test_the_toy_upstream_answers_malformed_http_the_same_way(caplog: pytest.LogCaptureFixture) -> None:
    """Every server of ours listens through proxy.serving.site, the model servers included."""
    async with ToyCompletionsServer() as toy:
        status, headers, body = await exchange(toy.base_url, CASES["transfer-encoding-gzip"][0])
    assert_openai_error(status, headers, body, 400)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
