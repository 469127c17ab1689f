"""Our own upstream error: each family turns its SDK's errors into an UpstreamError (kind, status,
retryable, retry-after; never the upstream's words), and the retry policy, the server's 502/504,
the metrics and readiness read only that, whatever the SDK (here: anthropic's, through the server)."""
from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from proxy.config import AppConfig, parse_upstream
from proxy.serving.app import GuidanceServer
from proxy.serving.errors import upstream_error
from proxy.testing.fake_anthropic import FakeAnthropicServer
from proxy.types import Probe
from proxy.upstreams.anthropic_messages import PrefillUnsupportedError, from_anthropic
from proxy.upstreams.errors import UpstreamError, malformed, probe_failure
from proxy.upstreams.openai_http import from_openai, refuses_n
from proxy.upstreams.retry import failure_kind, is_transient, retry_after_seconds
from tests.conftest import on_any_port

REQUEST = httpx2.Request("POST", "http://upstream.example/v1/messages")
SAID = "Invalid key sk-SECRET-123 (the upstream's own words)"


def response(status: int, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, headers=headers or {}, request=REQUEST)


def openai_status(status: int, headers: dict[str, str] | None = None, body: Any = None) -> openai.APIStatusError:
    return openai.APIStatusError(SAID, response=response(status, headers), body=body)


def anthropic_status(cls: type[anthropic.APIStatusError], status: int, headers: dict[str, str] | None = None,
                     message: str = SAID) -> anthropic.APIStatusError:
    return cls(message, response=response(status, headers), body={"type": "error", "error": {"message": message}})


def shape(e: UpstreamError) -> tuple[str, int | None, bool, float | None]:
    return e.kind, e.status, e.retryable, e.retry_after


@pytest.mark.parametrize("sdk_error, expected", [
    (openai_status(429, {"retry-after": "3"}), ("http", 429, True, 3.0)),
    (openai_status(503, {"retry-after-ms": "250", "retry-after": "9"}), ("http", 503, True, 0.25)),
    (openai_status(408), ("http", 408, True, None)),
    (openai_status(409), ("http", 409, True, None)),
    (openai_status(500), ("http", 500, True, None)),
    (openai_status(400), ("http", 400, False, None)),
    (openai_status(401), ("http", 401, False, None)),
    (openai_status(404), ("http", 404, False, None)),
    (openai.APITimeoutError(request=REQUEST), ("timeout", None, True, None)),
    (openai.APIConnectionError(message=SAID, request=REQUEST), ("connection", None, True, None)),
    (openai.APIResponseValidationError(response(200), None, message=SAID), ("malformed", None, True, None)),
])
def test_the_openai_families_translate_their_sdk_errors(sdk_error: openai.APIError,
                                                        expected: tuple[Any, ...]) -> None:
    ours = from_openai(sdk_error)
    assert shape(ours) == expected
    assert is_transient(ours) == ours.retryable and retry_after_seconds(ours) == ours.retry_after
    assert "SECRET" not in str(ours) + repr(ours)


def test_a_refusal_of_n_or_of_a_prompt_is_read_but_not_kept() -> None:
    n = from_openai(openai_status(400, body={"message": SAID, "param": "n"}))
    mistral = from_openai(openai_status(422, body={"message": "n must be 1"}))
    prompt = from_openai(openai_status(400, body={"message": "This prompt is too long"}))
    assert (n.refused, mistral.refused, prompt.refused) == ({"n"}, {"n"}, {"prompt"})
    assert refuses_n(n) and refuses_n(mistral) and not refuses_n(prompt)
    assert not refuses_n(from_openai(openai_status(500, body={"param": "n"})))  # a 5xx refuses nothing
    assert "SECRET" not in str(n)


@pytest.mark.parametrize("sdk_error, expected", [
    (anthropic_status(anthropic.RateLimitError, 429, {"retry-after": "2"}), ("http", 429, True, 2.0)),
    (anthropic_status(anthropic.InternalServerError, 529), ("http", 529, True, None)),
    (anthropic_status(anthropic.AuthenticationError, 401), ("http", 401, False, None)),
    (anthropic_status(anthropic.BadRequestError, 400), ("http", 400, False, None)),
    (anthropic.APITimeoutError(request=REQUEST), ("timeout", None, True, None)),
    (anthropic.APIConnectionError(message=SAID, request=REQUEST), ("connection", None, True, None)),
    (anthropic.APIResponseValidationError(response(200), None, message=SAID), ("malformed", None, True, None)),
])
def test_the_anthropic_family_translates_its_sdk_errors(sdk_error: anthropic.APIError,
                                                       expected: tuple[Any, ...]) -> None:
    ours = from_anthropic(sdk_error, "claude-x")
    assert type(ours) is UpstreamError and shape(ours) == expected
    assert "SECRET" not in str(ours) + repr(ours)


def test_a_refused_prefill_is_unsuitable_in_our_words() -> None:
    refusal = anthropic_status(anthropic.BadRequestError, 400,
                               message="This model does not support assistant message prefill. SECRET")
    ours = from_anthropic(refusal, "claude-sonnet-4-6")
    assert isinstance(ours, PrefillUnsupportedError) and shape(ours) == ("unsuitable", 400, False, None)
    assert "SECRET" not in str(ours) and str(ours).startswith("claude-sonnet-4-6 cannot continue a partial answer")
    answer = upstream_error(ours)
    assert answer is not None and (answer.status, answer.code) == (502, "upstream_unsuitable")


@pytest.mark.parametrize("error, status, code, label", [
    (UpstreamError("http", status=429), 502, "upstream_error", "http_429"),
    (UpstreamError("timeout"), 504, "upstream_timeout", "timeout"),
    (UpstreamError("connection"), 502, "upstream_error", "connection"),
    (malformed("no choices"), 502, "upstream_error", "malformed"),
])
def test_the_server_mapping_and_the_labels_read_our_error(error: UpstreamError, status: int, code: str,
                                                          label: str) -> None:
    answer = upstream_error(error)
    assert answer is not None and (answer.status, answer.code) == (status, code) and failure_kind(error) == label
    assert upstream_error(openai.APITimeoutError(request=REQUEST)) is None  # an SDK's own error: not ours to map
    assert failure_kind(ValueError("x")) == "ValueError"


def test_probe_words_stay_what_readiness_always_said() -> None:
    assert probe_failure(UpstreamError("http", status=401)) == Probe("refused", "HTTP 401")
    assert probe_failure(UpstreamError("connection")) == Probe("unreachable", "APIConnectionError")
    assert probe_failure(UpstreamError("timeout")) == Probe("unreachable", "APITimeoutError")


async def served_answer(fake: FakeAnthropicServer, **upstream: Any) -> tuple[int, dict[str, Any], GuidanceServer]:
    cfg = AppConfig(upstream=parse_upstream({"kind": "anthropic", "model": "claude-opus-4-5", "base_url": fake.base_url,
                                             "backoff_initial_s": 0.01, "backoff_max_s": 0.02, **upstream}))
    async with GuidanceServer(on_any_port(cfg), shutdown_timeout_s=0.5) as server:
        async with aiohttp.ClientSession() as s:
            async with s.post(server.base_url + "/chat/completions", json={
                    "model": "claude-opus-4-5", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}) as r:
                return r.status, await r.json(), server


async def test_an_anthropic_failure_reaches_the_servers_502_504_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    async with FakeAnthropicServer(api_key="sk-ant-test", failures=[429, 529, 529]) as fake:
        status, body, server = await served_answer(fake, max_attempts=3)
    assert status == 502 and body["error"]["message"] == "The upstream failed with HTTP 529 (after retries)."
    assert server.metrics.total("w2s_upstream_retries_total", kind="http_429") == 1
    assert server.metrics.total("w2s_upstream_retries_total", kind="http_529") == 1
    assert server.metrics.total("w2s_upstream_errors_total", kind="http_529") == 1
    async with FakeAnthropicServer(api_key="sk-ant-test", latency_s=1.0) as slow:
        status, body, server = await served_answer(slow, max_attempts=2, timeout_s=0.2)
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert server.metrics.total("w2s_upstream_retries_total", kind="timeout") == 1
    assert server.metrics.total("w2s_upstream_errors_total", kind="timeout") == 1
