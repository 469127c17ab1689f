"""Plain mode in front of all of a user's traffic: chat requests with tools, tool results,
structured output or streams of tool calls go to a chat upstream as they are and come back as it
answered, through the real openai SDK; guided modes still refuse them; the key's budget and the
metrics count what they billed; the upstream's refusal of a client's field reaches the client,
scrubbed of keys (proxy.serving.passthrough)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest

from proxy.config import AppConfig, OpenAIChatConfig, SearchConfig, ServerConfig
from proxy.serving.app import GuidanceServer
from proxy.serving.passthrough import scrubbed
from proxy.testing.fake_openai_chat import FakeChatServer
from proxy.upstreams.openai_chat import OpenAIChatUpstream
from tests.doubles import FnScorer
from tests.test_server import MODEL, distinct_words, metric, raw_post, served

TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@asynccontextmanager
async def proxied(server: dict[str, Any] | None = None, *, failures: tuple[int, ...] = (),
                  scorer: Any = None) -> AsyncIterator[tuple[FakeChatServer, GuidanceServer, openai.AsyncOpenAI]]:
    async with FakeChatServer("vllm", model="upstream-model", failures=failures) as fake:
        up_cfg = OpenAIChatConfig(model="upstream-model", base_url=fake.base_url, timeout_s=10.0,
                                  backoff_initial_s=0.01, backoff_max_s=0.02)
        cfg = AppConfig(upstream=up_cfg, search=SearchConfig(), server=ServerConfig(**(server or {})))
        async with OpenAIChatUpstream(up_cfg) as up, served(cfg, upstream=up, scorer=scorer) as (srv, client):
            yield fake, srv, client


async def test_a_tool_call_and_its_result_go_through_as_sent() -> None:
    async with proxied() as (fake, _, client):
        first = await client.chat.completions.create(model="upstream-model", messages=ASK, tools=TOOLS,
                                                     tool_choice="required", seed=3, max_tokens=6)
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
        assert first.model_dump(exclude_unset=True) == {**fake.responses[-1], "model": "upstream-model"}
        sent = fake.requests[-1]
        assert sent["tools"] == TOOLS and sent["tool_choice"] == "required" and sent["seed"] == 3
        followed = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
        second = await client.chat.completions.create(model="upstream-model", messages=followed, tools=TOOLS,
                                                      max_tokens=6, seed=3)
    answered = second.choices[0]  # a text answer (the toy may end it at once: the text may be empty)
    assert answered.finish_reason in ("stop", "length") and answered.message.content is not None
    assert answered.message.content == fake.responses[-1]["choices"][0]["message"]["content"]
    assert not answered.message.tool_calls
    assert fake.requests[-1]["messages"][-1] == followed[-1]
    assert json.loads(call.function.arguments)["text"]  # the toy's sampled text, as the fake wrote it


async def test_structured_output_and_several_choices() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"]}
    async with proxied() as (fake, _, client):
        answer = await client.chat.completions.create(
            model="upstream-model", messages=ASK, n=3, seed=1, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": schema}})
    assert [json.loads(c.message.content or "").keys() for c in answer.choices] == [{"title", "year"}] * 3
    assert answer.usage is not None and answer.usage.total_tokens == fake.responses[-1]["usage"]["total_tokens"]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_of_tool_calls_is_relayed_chunk_by_chunk(include_usage: bool) -> None:
    async with proxied() as (fake, srv, client):
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = await client.chat.completions.create(model="upstream-model", messages=ASK, tools=TOOLS,
                                                      tool_choice="required", stream=True, max_tokens=6,
                                                      **options)  # type: ignore[call-overload]
        chunks = [c async for c in stream]
    whole = fake.responses[-1]["choices"][0]["message"]["tool_calls"][0]
    args = "".join(tc.function.arguments or "" for c in chunks for ch in c.choices
                   for tc in ch.delta.tool_calls or [])
    names = [tc.function.name for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or []
             if tc.function and tc.function.name]
    assert names == [whole["function"]["name"]] and args == whole["function"]["arguments"]
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}  # asked for the bill either way
    usages = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert [u.model_dump(exclude_unset=True) for u in usages] == [fake.responses[-1]["usage"]]
    else:
        assert usages == [] and all(c.choices for c in chunks)
    assert {c.model for c in chunks} == {"upstream-model"}


async def test_guided_modes_and_a_server_that_says_no_still_refuse_tools() -> None:
    async with proxied(scorer=FnScorer(distinct_words)) as (fake, srv, _):
        body = {"model": "upstream-model+bon4", "messages": ASK, "tools": TOOLS, "max_tokens": 4}
        status, answer = await raw_post(srv, "/chat/completions", json.dumps(body).encode())
        assert status == 400 and answer["error"]["param"] == "tools" and fake.requests == []
    async with proxied({"passthrough": False}) as (fake, srv, _):
        body = {"model": "upstream-model", "messages": ASK, "response_format": {"type": "json_object"}}
        status, answer = await raw_post(srv, "/chat/completions", json.dumps(body).encode())
    assert status == 400 and answer["error"]["param"] == "response_format" and fake.requests == []
    assert "server.passthrough is off" in answer["error"]["message"]


async def test_a_forwarded_request_orders_no_more_than_the_caps_allow() -> None:
    async with proxied({"caps": {"max_tokens": 64, "max_w_times_k": 4}}) as (fake, srv, _):
        for field, value, cap in (("max_tokens", 65, 64), ("max_completion_tokens", 100, 64), ("n", 5, 4)):
            body = {"model": "upstream-model", "messages": ASK, "tools": TOOLS, field: value}
            status, answer = await raw_post(srv, "/chat/completions", json.dumps(body).encode())
            assert status == 400 and answer["error"]["param"] == field, answer
            assert answer["error"]["message"].startswith(f"{field} = {value} exceeds this server's cap of {cap}")
    assert fake.requests == []


async def test_the_upstreams_refusal_of_a_field_reaches_the_client() -> None:
    async with proxied() as (fake, _, client):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="upstream-model", messages=ASK,
                                                 tools=[{"type": "function", "function": {}}])  # type: ignore[list-item]
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "tools[0].function.name"
    assert "Missing required parameter: 'tools[0].function.name'" in error["message"]
    assert len(fake.requests) == 1  # a client error is not retried


async def test_failures_are_retried_then_answered_in_our_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-proj-SECRET0123456789")
    async with proxied(failures=(503, 401)) as (fake, srv, client):
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="upstream-model", messages=ASK, tools=TOOLS)
        assert failed.value.status_code == 502 and len(fake.requests) == 2  # 503 retried, 401 not
        answer = await client.chat.completions.create(model="upstream-model", messages=ASK, tools=TOOLS)
        text = srv.metrics.render()[0].decode()
    assert answer.choices[0].message.tool_calls
    assert metric(text, "w2s_searches_total", mode="forwarded", outcome="error") == 1
    assert metric(text, "w2s_searches_total", mode="forwarded", outcome="finished") == 1
    assert "SECRET" not in str(failed.value.body)


async def test_the_keys_budget_is_charged_what_the_upstream_billed() -> None:
    async with proxied({"key_budget_tokens": 60}) as (fake, srv, client):
        await client.chat.completions.create(model="upstream-model", messages=ASK, tools=TOOLS, max_tokens=40)
        billed = fake.responses[-1]["usage"]
        text = srv.metrics.render()[0].decode()
        for kind, count in (("prompt_uncached", billed["prompt_tokens"]),
                            ("completion", billed["completion_tokens"])):
            assert metric(text, "w2s_upstream_tokens_total", mode="forwarded", kind=kind) == count
        assert billed["total_tokens"] <= 60
        while billed["total_tokens"] < 60:  # spend the rest of the key's budget
            await client.chat.completions.create(model="upstream-model", messages=ASK, tools=TOOLS, max_tokens=40)
            billed = {"total_tokens": billed["total_tokens"] + fake.responses[-1]["usage"]["total_tokens"]}
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="upstream-model", messages=ASK, tools=TOOLS)


def test_keys_are_scrubbed_from_what_an_upstream_said() -> None:
    secret = "sk-proj-SECRET0123456789"
    said = f"Incorrect API key provided: sk-proj-SE***789; also {secret[4:20]} and key-abcdef123"
    out = scrubbed(said, [secret])
    assert "SECRET" not in out and "abcdef123" not in out and out.startswith("Incorrect API key provided: ")

