"""The Anthropic Messages upstream against a fake of the API through the real anthropic SDK."""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.config import AnthropicConfig, SearchConfig
from proxy.search import search
from proxy.serving.errors import upstream_error
from proxy.testing.fake_anthropic import FakeAnthropicServer
from proxy.testing.toy_model import DEFAULT_VOCAB
from proxy.types import Continuation, Conversation, Probe, SamplingParams
from proxy.upstreams.anthropic_messages import AnthropicMessagesUpstream, PrefillUnsupportedError, to_messages
from proxy.upstreams.errors import UpstreamError
from proxy.upstreams.registry import make_upstream
from proxy.upstreams.seam import join_held
from tests.doubles import FnScorer

KEY = "sk-ant-test-SECRET-0123456789"
MODEL = "claude-opus-4-5-20251101"
STORY = Conversation.instruction("Tell me a story about the cat")


@pytest.fixture(autouse=True)
def anthropic_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-must-not-be-sent")


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropicServer]:
    async with FakeAnthropicServer(api_key=KEY) as server:
        yield server


def config(server: FakeAnthropicServer, **kw: Any) -> AnthropicConfig:
    base: dict[str, Any] = dict(kind="anthropic", model=MODEL, base_url=server.base_url, backoff_initial_s=0.01,
                                backoff_max_s=0.05, timeout_s=10.0)
    base.update(kw)
    return AnthropicConfig.model_validate(base)


def prefill_of(body: dict[str, Any]) -> str | None:
    last = body["messages"][-1]
    return last["content"] if last["role"] == "assistant" else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_body_system_field_alternation_prefill_stops_and_extra_body(fake: FakeAnthropicServer) -> None:
    conv = Conversation.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}, {"role": "system", "content": "Be kind."},
                              {"role": "user", "content": "Tell me"}, {"role": "user", "content": "a story"}])
    async with AnthropicMessagesUpstream(config(fake, extra_body={"top_k": 5})) as up:
        res = await up.sample(conv, "Once upon a", SamplingParams(n=1, max_tokens=6, stop=(".", "\n"), temperature=0.5))
    [body] = fake.requests
    assert body["system"] == "Be brief.\n\nBe kind."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant"]
    assert body["messages"][2]["content"] == [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story"}]
    assert prefill_of(body) == "Once upon a"
    assert body["stop_sequences"] == ["."]  # a whitespace-only stop is refused by the API: cut here instead
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_k"]) == (MODEL, 6, 0.5, 5)
    assert not {"n", "seed", "top_p", "stop"} & body.keys()
    assert fake.headers[0]["anthropic-version"]  # the SDK's own API version
    assert res.calls == 1 and res.usage == up.usage and up.api_calls == 1


async def test_n_samples_are_n_parallel_requests_under_the_concurrency_limit() -> None:
    async with FakeAnthropicServer(api_key=KEY, latency_s=0.3) as server:
        async with AnthropicMessagesUpstream(config(server)) as up:
            res = await up.sample(STORY, "", SamplingParams(n=4, max_tokens=8, seed=3))
        assert len(server.requests) == 4 and server.max_in_flight == 4
        assert res.calls == 4 and len(res.continuations) == 4 and res.usage == up.usage
        assert len({c.text for c in res.continuations}) > 1  # each request samples on its own
        async with AnthropicMessagesUpstream(config(server, max_concurrency=2)) as up:
            server.max_in_flight = 0
            await up.sample(STORY, "", SamplingParams(n=5, max_tokens=2))
        assert server.max_in_flight == 2


async def test_whitespace_stops_are_cut_here() -> None:
    async with FakeAnthropicServer(api_key=KEY, spacing="trailing", eos_prob=0.0) as server:
        async with AnthropicMessagesUpstream(config(server)) as up:
            res = await up.sample(STORY, "", SamplingParams(n=2, max_tokens=6, stop=(" ",)))
    assert all("stop_sequences" not in b for b in server.requests)
    for c, text in zip(res.continuations, server.responses):
        assert (c.text, c.finished, c.num_tokens, c.finish_reason) == (text.split(" ")[0], True, 1, "stop")


async def test_finish_reasons_and_token_counts(fake: FakeAnthropicServer) -> None:
    async with AnthropicMessagesUpstream(config(fake)) as up:
        res = await up.sample(STORY, "", SamplingParams(n=12, max_tokens=5))
    for c, text in zip(res.continuations, fake.responses):
        assert c.text == text
        words = len(text.split())
        assert (c.finished, c.num_tokens, c.finish_reason) in {(True, words, "stop"), (False, 5, "length")}
    assert {c.finished for c in res.continuations} == {True, False}


async def test_trailing_whitespace_is_held_back_and_joined_exactly() -> None:
    for spacing in ("trailing", "leading"):
        async with FakeAnthropicServer(api_key=KEY, spacing=spacing) as server:
            async with AnthropicMessagesUpstream(config(server)) as up:  # always held: no field to turn it off
                res = await up.sample(STORY, "The cat \n", SamplingParams(n=3, max_tokens=4))
            assert [prefill_of(b) for b in server.requests] == ["The cat"] * 3
            assert [c.text for c in res.continuations] == [join_held(" \n", t) for t in server.responses]
            if spacing == "leading":  # " sat on": the space the beam already ends with is not doubled
                assert all(not c.text.startswith(" ") for c in res.continuations)


async def test_a_search_over_the_fake_loses_and_doubles_nothing_at_the_seams() -> None:
    async with FakeAnthropicServer(api_key=KEY, spacing="trailing", eos_prob=0.0) as server:
        async with AnthropicMessagesUpstream(config(server)) as up:
            result = await search(STORY, up, FnScorer(lambda t, f: float(len(t))),
                                  SearchConfig(w=2, k=2, l=4, max_new_tokens=12))
    prefills = [prefill_of(b) for b in server.requests]
    assert len(prefills) == 4 + 4 + 4 and prefills.count(None) == 4  # w*k of the root, then w*k per step
    assert all(p is None or p == p.rstrip() for p in prefills)
    for node in result.nodes.values():
        if node.parent is None:
            continue
        parent = result.nodes[node.parent].text
        sent, held = parent.rstrip(), parent[len(parent.rstrip()):]
        assert any((p or "") == sent and join_held(held, r) == node.chunk for p, r in zip(prefills, server.responses))
    vocab = {w.strip() for w in DEFAULT_VOCAB}
    words = result.text.split(" ")
    assert result.text.endswith(" ") and words[-1] == "" and set(words[:-1]) <= vocab  # one space between words
    assert len(words) - 1 == 12 == result.tokens


async def test_thinking_blocks_are_not_part_of_the_answer() -> None:
    async with FakeAnthropicServer(api_key=KEY, thinking=True, thinking_words=3, eos_prob=0.0) as server:
        async with AnthropicMessagesUpstream(config(server)) as up:
            res = await up.sample(STORY, "", SamplingParams(n=2, max_tokens=8))
            assert [c.text for c in res.continuations] == server.responses
            assert all("think" not in c.text and c.num_tokens == 5 and not c.finished for c in res.continuations)
            spent = await up.sample(STORY, "", SamplingParams(n=1, max_tokens=3))  # thinking took the whole budget
            assert spent.continuations == [Continuation("", False, 0, "length")]
            assert res.usage.completion_tokens == 2 * 8  # billed: thinking included


async def test_429_is_retried_honouring_retry_after_and_529_is_retried() -> None:
    async with FakeAnthropicServer(api_key=KEY, failures=[429], retry_after_s=0.3) as server:
        async with AnthropicMessagesUpstream(config(server, backoff_max_s=1.0)) as up:
            t0 = time.perf_counter()
            res = await up.sample(STORY, "", SamplingParams(n=1, max_tokens=4))
            assert time.perf_counter() - t0 >= 0.3  # backoff alone would have waited ~0.01 s
        assert len(server.requests) == 2 and res.calls == 1 and up.api_calls == 1
    async with FakeAnthropicServer(api_key=KEY, failures=[529, 529]) as server:
        async with AnthropicMessagesUpstream(config(server)) as up:
            res = await up.sample(STORY, "", SamplingParams(n=1, max_tokens=4))
        assert len(server.requests) == 3 and len(res.continuations) == 1


async def test_a_model_refusing_prefill_fails_clearly_after_one_request() -> None:
    async with FakeAnthropicServer(api_key=KEY, models=["claude-sonnet-4-6"]) as server:
        async with AnthropicMessagesUpstream(config(server, model="claude-sonnet-4-6")) as up:
            ok = await up.sample(STORY, "", SamplingParams(n=2, max_tokens=3))  # no prefill yet: fine
            assert len(ok.continuations) == 2 and len(server.requests) == 2
            with pytest.raises(PrefillUnsupportedError, match="cannot continue a partial answer") as info:
                await up.sample(STORY, "Once upon a", SamplingParams(n=4, max_tokens=3))
            assert len(server.requests) == 3  # one request, not four, and not retried
            with pytest.raises(PrefillUnsupportedError):
                await up.sample(STORY, "The cat", SamplingParams(n=2, max_tokens=3))
            assert len(server.requests) == 3  # known now: no request at all
    assert isinstance(info.value, UpstreamError)
    assert (info.value.kind, info.value.status, info.value.retryable) == ("unsuitable", 400, False)
    err = upstream_error(info.value)  # the client is told why, in our words
    assert err is not None and err.status == 502 and err.code == "upstream_unsuitable"
    assert "claude-sonnet-4-6 cannot continue a partial answer" in err.body.error.message


async def test_failures_after_retries_become_502_and_504() -> None:
    async with FakeAnthropicServer(api_key=KEY, failures=[529] * 3) as server:
        async with AnthropicMessagesUpstream(config(server, max_attempts=3)) as up:
            with pytest.raises(UpstreamError) as info:
                await up.sample(STORY, "", SamplingParams(n=1, max_tokens=3))
        assert len(server.requests) == 3
    assert info.value.status == 529 and upstream_error(info.value).status == 502  # type: ignore[union-attr]
    async with FakeAnthropicServer(api_key=KEY, latency_s=1.0) as server:
        async with AnthropicMessagesUpstream(config(server, max_attempts=2, timeout_s=0.2)) as up:
            with pytest.raises(UpstreamError) as timeout:
                await up.sample(STORY, "", SamplingParams(n=1, max_tokens=3))
    assert timeout.value.kind == "timeout" and upstream_error(timeout.value).status == 504  # type: ignore[union-attr]
    cfg = AnthropicConfig(model=MODEL, base_url=f"http://127.0.0.1:{free_port()}", max_attempts=2,
                         backoff_initial_s=0.01, backoff_max_s=0.02)
    async with AnthropicMessagesUpstream(cfg) as up:
        with pytest.raises(UpstreamError) as refused:
            await up.sample(STORY, "", SamplingParams(n=1, max_tokens=3))
    assert refused.value.kind == "connection"
    assert upstream_error(refused.value).status == 502  # type: ignore[union-attr]


async def test_the_key_never_reaches_logs_or_errors(caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("WRONG_ANTHROPIC_KEY", "sk-ant-wrong-SECRET-987")
    async with FakeAnthropicServer(api_key=KEY, failures=[429]) as server:
        async with AnthropicMessagesUpstream(config(server)) as up:
            await up.sample(STORY, "x", SamplingParams(n=1, max_tokens=3))
            assert await up.probe() == Probe("reachable")
        async with AnthropicMessagesUpstream(config(server, api_key_env="WRONG_ANTHROPIC_KEY")) as up:
            with pytest.raises(UpstreamError) as info:
                await up.sample(STORY, "x", SamplingParams(n=1, max_tokens=3))
    assert "retrying" in caplog.text and "Request options" in caplog.text  # the SDK's debug log was captured
    assert "sk-openai" not in str(server.headers)
    assert info.value.status == 401 and str(info.value) == "the upstream answered HTTP 401"  # ours, not the API's
    for text in (caplog.text, str(info.value), repr(info.value), repr(info.value.__cause__), str(server.headers)):
        assert "SECRET" not in text


async def test_temperature_above_one_is_clamped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeAnthropicServer(api_key=KEY, exclusive_temperature_top_p=False) as server:  # an older model
        async with AnthropicMessagesUpstream(config(server)) as up:
            await up.sample(STORY, "", SamplingParams(n=2, max_tokens=3, temperature=1.6, top_p=0.9))
    assert [(b["temperature"], b["top_p"]) for b in server.requests] == [(1.0, 0.9)] * 2
    assert caplog.text.count("above Anthropic's maximum") == 1


async def test_temperature_with_top_p_refused_by_a_newer_model_is_not_retried(fake: FakeAnthropicServer) -> None:
    async with AnthropicMessagesUpstream(config(fake)) as up:
        with pytest.raises(UpstreamError) as refused:
            await up.sample(STORY, "", SamplingParams(n=1, max_tokens=3, temperature=0.7, top_p=0.9))
    assert len(fake.requests) == 1 and (refused.value.status, refused.value.retryable) == (400, False)
    assert "cannot both be specified" in str(refused.value.__cause__)  # the API's words stay in the SDK's error


async def test_a_full_context_window_sends_nothing(fake: FakeAnthropicServer) -> None:
    async with AnthropicMessagesUpstream(config(fake, context_window=30)) as up:
        res = await up.sample(STORY, "the cat sat on", SamplingParams(n=2, max_tokens=100))
        assert fake.requests[0]["max_tokens"] < 30
        full = await up.sample(STORY, " the" * 40, SamplingParams(n=2, max_tokens=5))
    assert len(fake.requests) == 2 and res.calls == 2
    assert full.calls == 0 and full.continuations == [Continuation("", False, 0, "length")] * 2


async def test_probe_states(fake: FakeAnthropicServer) -> None:
    async with AnthropicMessagesUpstream(config(fake)) as up:
        assert await up.probe() == Probe("reachable")
    async with AnthropicMessagesUpstream(config(fake, model="claude-opus-4-5")) as up:  # an alias, not listed
        assert await up.probe() == Probe("reachable")
    async with AnthropicMessagesUpstream(config(fake, model="claude-nonexistent")) as up:
        assert (await up.probe()).state.startswith("model unknown")
    async with AnthropicMessagesUpstream(config(fake, api_key_env="WRONG_KEY")) as up:
        assert await up.probe() == Probe("refused", "HTTP 401")  # a keyless client sends "no-key"
    cfg = AnthropicConfig(model=MODEL, base_url=f"http://127.0.0.1:{free_port()}")
    async with AnthropicMessagesUpstream(cfg) as up:
        assert (await up.probe()).state.startswith("unreachable")
    assert not fake.requests  # probing sent no messages


async def test_registry_builds_it_with_the_anthropic_key(fake: FakeAnthropicServer) -> None:
    up = make_upstream(config(fake))  # api_key_env left at its default: ANTHROPIC_API_KEY, not OPENAI_API_KEY
    assert isinstance(up, AnthropicMessagesUpstream)
    async with up:
        await up.sample(STORY, "", SamplingParams(n=1, max_tokens=2))
    assert len(fake.requests) == 1 and fake.responses  # the fake accepted the key


def test_to_messages_merges_roles_and_drops_empty_turns() -> None:
    conv = Conversation.chat([{"role": "user", "content": "a"}, {"role": "user", "content": ""},
                              {"role": "developer", "content": "d"}])
    assert to_messages(conv, "") == ("d", [{"role": "user", "content": "a"}])
    assert to_messages(conv, "p")[1][-1] == {"role": "assistant", "content": "p"}


BASE = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("change, headers, status, says", [
    ({}, {"x-api-key": KEY}, 200, ""),
    ({}, {"authorization": f"Bearer {KEY}"}, 200, ""),  # how anthropic 2.x sends the key
    ({}, {}, 401, "x-api-key"),
    ({}, {"x-api-key": "wrong"}, 401, "invalid x-api-key"),
    ({"max_tokens": None}, {"x-api-key": KEY}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, {"x-api-key": KEY}, 400,
     "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b "}]}, {"x-api-key": KEY},
     400, "trailing whitespace"),
    ({"n": 2}, {"x-api-key": KEY}, 400, "n: Extra inputs"),
    ({"seed": 1}, {"x-api-key": KEY}, 400, "seed: Extra inputs"),
    ({"temperature": 1.5}, {"x-api-key": KEY}, 400, "temperature"),
    ({"temperature": 0.5, "top_p": 0.9}, {"x-api-key": KEY}, 400, "cannot both"),
    ({"stop_sequences": ["\n"]}, {"x-api-key": KEY}, 400, "non-whitespace"),
    ({"model": "claude-opus-4-6", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     {"x-api-key": KEY}, 400, "prefill"),
])
async def test_the_fake_refuses_what_the_api_refuses(fake: FakeAnthropicServer, change: dict[str, Any],
                                                      headers: dict[str, str], status: int, says: str) -> None:
    body = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fake.base_url}/v1/messages", json=body,
                          headers={"anthropic-version": "2023-06-01", **headers}) as r:
            answer = await r.json()
    assert r.status == status
    if status != 200:
        assert answer["type"] == "error" and says in answer["error"]["message"]
    else:
        assert answer["type"] == "message" and answer["content"][0]["type"] == "text"
