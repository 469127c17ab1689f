"""Request ids and log lines: `X-Request-Id` accepted or made, on every response (errors and
streams too), on every log line written while serving that request, text or JSON."""
from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import AppConfig
from proxy.logs import JsonFormatter, request_id_from, setup_logging
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.types import Conversation, SampleResult, SamplingParams
from proxy.upstreams.base import Upstream
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import upstream_config
from tests.test_server import MODEL, metric, root, served

MADE = r"req_[0-9a-f]{32}"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The root logger writing JSON lines into a buffer for one test, then put back as it was."""
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    buf = io.StringIO()
    setup_logging(1, "json", buf)
    try:
        yield buf
    finally:
        for h in list(root_logger.handlers):
            root_logger.removeHandler(h)
        for h in handlers:
            root_logger.addHandler(h)
        root_logger.setLevel(level)


class TalkingUpstream(Upstream):
    """Logs a line from inside the search (a task the request started) on every sample."""

    def __init__(self, inner: Upstream) -> None:
        self.inner = inner

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        logging.getLogger("tests.upstream").warning("sampling for %r", conversation.messages[-1]["content"][:10])
        return await self.inner.sample(conversation, partial, params)


def test_a_client_id_is_kept_when_sane_and_replaced_otherwise() -> None:
    assert request_id_from("abc-123_X.y:z") == "abc-123_X.y:z"
    for bad in (None, "", "has space", "x" * 129, "new\nline", "é"):
        made = request_id_from(bad)
        assert made != bad and made.startswith("req_") and len(made) == 36


async def test_request_id_round_trip_through_the_openai_sdk(loopback: ToyCompletionsServer) -> None:
    async with served(AppConfig(upstream=upstream_config(loopback))) as (server, client):
        made = await client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
        kept = await client.completions.create(model=MODEL, prompt="hi", max_tokens=4,
                                               extra_headers={"X-Request-Id": "client-id-7"})
        raw = await client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=4)
        bad = await client.completions.create(model=MODEL, prompt="hi", max_tokens=4,
                                              extra_headers={"X-Request-Id": "no spaces please"})
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model="nope", prompt="hi", extra_headers={"X-Request-Id": "e-1"})
        async with aiohttp.ClientSession() as http:
            # seeded: an answer that is empty at once (the toy model's EOS first) has no first token
            async with http.post(server.base_url + "/completions", headers={"X-Request-Id": "s-1"},
                                 json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True,
                                       "seed": 1}) as r:
                stream_status, stream_id, streamed = r.status, r.headers.get("X-Request-Id"), await r.read()
            async with http.get(root(server) + "/nowhere") as r:
                unknown_route = r.status, r.headers.get("X-Request-Id")
            async with http.get(root(server) + "/metrics") as r:
                metrics = await r.text()
    assert made._request_id is not None and re.fullmatch(MADE, made._request_id)
    assert kept._request_id == "client-id-7"
    assert raw.headers["x-request-id"] == raw.parse()._request_id and re.fullmatch(MADE, raw.headers["x-request-id"])
    assert bad._request_id != "no spaces please" and re.fullmatch(MADE, str(bad._request_id))
    assert missing.value.request_id == "e-1"
    assert (stream_status, stream_id) == (200, "s-1")
    chunks = [json.loads(line[6:]) for line in streamed.split(b"\n") if line.startswith(b"data: {")]
    assert "".join(c["text"] for chunk in chunks for c in chunk["choices"])  # something was said
    assert unknown_route[0] == 404 and unknown_route[1] is not None and re.fullmatch(MADE, unknown_route[1])
    # the metrics: a `model` label bounded to the served ids, and the streams' time to first token
    assert metric(metrics, "w2s_requests_total", endpoint="/v1/completions", model=MODEL, status="200") == 5  # with the stream
    assert metric(metrics, "w2s_requests_total", endpoint="/v1/completions", model="other", status="404") == 1
    assert metric(metrics, "w2s_time_to_first_token_seconds_count", model=MODEL) == 1
    assert metric(metrics, "w2s_request_duration_seconds_count", model=MODEL) == 5


async def test_every_log_line_of_a_request_carries_its_id(loopback: ToyCompletionsServer,
                                                          log_lines: io.StringIO) -> None:
    cfg = AppConfig(upstream=upstream_config(loopback))
    async with OpenAICompletionsUpstream(cfg.upstream) as inner:
        async with served(cfg, upstream=TalkingUpstream(inner)) as (_, client):
            await client.completions.create(model=MODEL, prompt="first one", max_tokens=4,
                                            extra_headers={"X-Request-Id": "one"})
            await client.completions.create(model=MODEL, prompt="second one", max_tokens=4,
                                            extra_headers={"X-Request-Id": "two"})
    logging.getLogger("tests").warning("outside any request")
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    assert all(set(entry) >= {"time", "level", "logger", "message", "request_id"} for entry in lines)
    ours = [(e["request_id"], e["message"]) for e in lines if e["logger"] in ("tests.upstream", "tests")]
    assert ours == [("one", "sampling for 'first one'"), ("two", "sampling for 'second one'"),
                    (None, "outside any request")]


def test_json_lines_hold_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("w2s.server", logging.ERROR, __file__, 1, "failed %s", ("x",), None)
        record.exc_info = sys.exc_info()
    entry: dict[str, Any] = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed x" and entry["level"] == "ERROR" and "ValueError: boom" in entry["exception"]
    assert entry["time"].endswith("+00:00")
