"""Fields that cannot change the answer are accepted and ignored (agent SDKs and LangChain send
them); the ones the search cannot honour stay a 400 naming the field; both lists are declared
once (proxy.protocol.requests) and the manual's tables are checked against them here."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from proxy.config import AppConfig, OpenAIChatConfig, SearchConfig
from proxy.protocol.requests import CHAT_REFUSED, IGNORED_FIELDS, ChatCompletionRequest, CompletionRequest
from proxy.testing.fake_openai_chat import FakeChatServer
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.types import Conversation
from proxy.upstreams.base import conversation_key
from proxy.upstreams.openai_chat import OpenAIChatUpstream
from tests.doubles import FnScorer
from tests.test_server import MODEL, app_config, distinct_words, raw_post, served

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Say hi."}]
# What a client sends in each ignored field (their values are never looked at).
SENT: dict[str, Any] = {
    "user": "user-1", "safety_identifier": "hash-1", "store": True, "metadata": {"app": "agent"},
    "service_tier": "auto", "prompt_cache_key": "client-key", "prompt_cache_retention": "24h",
    "parallel_tool_calls": False, "prediction": {"type": "content", "content": "Hi"},
    "reasoning_effort": "low", "verbosity": "low",
}
# For each refused chat field, a value that asks for what the search cannot do.
ASKING: dict[str, Any] = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "required", "functions": [{"name": "f"}], "function_call": {"name": "f"},
    "response_format": {"type": "json_object"}, "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "mp3"}, "web_search_options": {},
}
# Fields both routes already refused at a value that changes the answer.
MEANINGFUL = {"n": 2, "logit_bias": {"50256": -100}, "presence_penalty": 0.5, "frequency_penalty": 1.0}


def body(route: str, model: str = MODEL, **fields: Any) -> bytes:
    prompt = {"messages": MESSAGES} if route == "/chat/completions" else {"prompt": "Say hi."}
    return json.dumps({"model": model, "max_tokens": 4, **prompt, **fields}).encode()


def section_rows(title: str) -> list[str]:
    """The table rows (header and rule left out) of the manual's section `title`."""
    page = (ROOT / "docs" / "serving.md").read_text()
    section = page.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_the_manual_lists_exactly_the_declared_fields() -> None:
    rows = section_rows("Fields accepted and ignored")
    ignored = [f"| `{name}` | {why} |" for name, why in IGNORED_FIELDS.items()]
    refused = [f"| `{name}` | {', '.join(f'`{json.dumps(v)}`' for v in r.harmless)} | {r.why} |"
               for name, r in CHAT_REFUSED.items()]
    assert rows == ignored + refused
    assert set(SENT) | {"stream_options.include_obfuscation"} == set(IGNORED_FIELDS)
    assert set(ASKING) == set(CHAT_REFUSED)


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_ignored_fields_take_any_value_and_are_dropped(model: Any) -> None:
    base = {"model": MODEL, "messages": MESSAGES} if model is ChatCompletionRequest else {"model": MODEL, "prompt": "x"}
    for value in (None, 3, "x", [1, {"a": None}], {"b": [True]}):
        sent = {**base, **dict.fromkeys(SENT, value), "stream_options": {"include_usage": True,
                                                                          "include_obfuscation": value}}
        req = model.model_validate_json(json.dumps(sent))
        assert req.model_dump(exclude_unset=True).keys() == {*base, "stream_options"}
        assert req.include_usage


async def test_each_ignored_field_is_accepted_on_both_routes(loopback: ToyCompletionsServer) -> None:
    async with served(app_config(loopback), scorer=FnScorer(distinct_words)) as (srv, _):
        for route in ("/chat/completions", "/completions"):
            for model in (MODEL, f"{MODEL}+bon4"):
                for name, value in [*SENT.items(), ("stream_options", {"include_obfuscation": False})]:
                    status, answer = await raw_post(srv, route, body(route, model, **{name: value}))
                    assert status == 200, (route, model, name, answer)
                status, answer = await raw_post(srv, route, body(route, model, **SENT))
                assert status == 200 and answer["choices"], (route, model, answer)
    assert loopback.requests and not any(set(SENT) & set(sent) for sent in loopback.requests)


@pytest.mark.parametrize("model", [MODEL, f"{MODEL}+bon4"])
async def test_each_field_the_search_cannot_honour_is_a_400_naming_it(loopback: ToyCompletionsServer,
                                                                      model: str) -> None:
    async with served(app_config(loopback), scorer=FnScorer(distinct_words)) as (srv, _):
        refused = [("/chat/completions", name, value) for name, value in ASKING.items()]
        refused += [(route, name, value) for route in ("/chat/completions", "/completions")
                    for name, value in MEANINGFUL.items()]
        refused += [("/chat/completions", "logprobs", True), ("/chat/completions", "top_logprobs", 2),
                    ("/completions", "logprobs", 1), ("/completions", "echo", True),
                    ("/completions", "tools", [])]  # not a field of OpenAI's completions at all
        for route, name, value in refused:
            status, answer = await raw_post(srv, route, body(route, model, **{name: value}))
            error = answer["error"]
            assert status == 400 and error["param"] == name and error["message"].startswith(f"{name}: "), answer
            if name in CHAT_REFUSED and route == "/chat/completions":  # plain mode: and why it is not forwarded
                assert error["message"].startswith(f"{name}: {CHAT_REFUSED[name].why}")
        for name, refusal in CHAT_REFUSED.items():  # at a harmless value, each asks for nothing
            for value in refusal.harmless:
                status, answer = await raw_post(srv, "/chat/completions", body("/chat/completions", model,
                                                                                **{name: value}))
                assert status == 200, (name, value, answer)
    assert all(not set(CHAT_REFUSED) & set(sent) for sent in loopback.requests)


async def test_plain_mode_does_not_forward_tools_to_a_completions_upstream(loopback: ToyCompletionsServer) -> None:
    """Only a chat upstream takes a chat body as it is (tests/test_passthrough.py): over a
    completions upstream, tools are refused in plain mode too, before the upstream is called."""
    async with served(app_config(loopback)) as (srv, _):
        status, answer = await raw_post(srv, "/chat/completions", body("/chat/completions", tools=ASKING["tools"],
                                                                        tool_choice="auto"))
    assert status == 400 and answer["error"]["param"] == "tools" and loopback.requests == []
    assert "(openai-completions) is not a chat API" in answer["error"]["message"]


async def test_sdk_fields_reach_a_strict_chat_upstream_as_the_servers_own() -> None:
    """Through the openai SDK, as agent code sends them, to a chat API that refuses unknown
    fields: nothing of the client's is passed on, and the cache key is the server's own."""
    async with FakeChatServer("mistral") as fake:
        upstream_cfg = OpenAIChatConfig(model=MODEL, base_url=fake.base_url, continuation="prefix",
                                        seed_param="random_seed", cache_affinity="prompt_cache_key", timeout_s=10.0)
        cfg = AppConfig(upstream=upstream_cfg, search=SearchConfig())
        async with OpenAIChatUpstream(upstream_cfg) as up, served(cfg, upstream=up) as (_, client):
            sent = {k: v for k, v in SENT.items() if k not in ("prompt_cache_retention", "verbosity")}
            answer = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=4, tools=[], tool_choice="none",  # type: ignore[arg-type]
                response_format={"type": "text"}, extra_body={"prompt_cache_retention": "24h", "verbosity": "low"},
                **sent)
    assert answer.choices[0].message.content is not None and fake.requests
    keys = {r.get("prompt_cache_key") for r in fake.requests}
    assert keys == {conversation_key(Conversation.instruction("Say hi."))} != {"client-key"}
    assert not any(set(r) & (set(SENT) - {"prompt_cache_key"} | set(CHAT_REFUSED)) for r in fake.requests)
    assert not re.search(r"user-1|hash-1|agent", json.dumps(fake.requests))
