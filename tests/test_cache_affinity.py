"""Requests a prompt cache can serve: with `cache_affinity` an OpenAI-compatible upstream sends
every request about one conversation with the same key (a `prompt_cache_key` body field, or
Fireworks' `x-session-affinity` header), through a whole search, and nothing without it."""
from __future__ import annotations

import re

from proxy.config import OpenAIChatConfig
from proxy.config import SearchConfig
from proxy.search import search
from proxy.testing.fake_openai_chat import FakeChatServer
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.types import Conversation
from proxy.upstreams.openai_chat import OpenAIChatUpstream
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from proxy.upstreams.base import conversation_key
from tests.conftest import upstream_config
from tests.doubles import FnScorer

CBS = SearchConfig(w=2, k=2, l=4, max_new_tokens=12, seed=5)


def words(text: str, finished: bool) -> float:
    return float(len(re.findall(r"\w+", text)))


async def test_a_chat_search_sends_one_prompt_cache_key_per_conversation() -> None:
    first, second = (Conversation.instruction(q) for q in ("Name a pet.", "Name a tree."))
    async with FakeChatServer("mistral", eos_prob=0.0) as fake:  # nothing finishes early
        cfg = OpenAIChatConfig(model="toy-chat", base_url=fake.base_url, continuation="prefix",
                               seed_param="random_seed", cache_affinity="prompt_cache_key", timeout_s=10.0)
        async with OpenAIChatUpstream(cfg) as up:
            await search(first, up, FnScorer(words), CBS)
            sent_first = len(fake.requests)
            await search(second, up, FnScorer(words), CBS)
    keys = [body.get("prompt_cache_key") for body in fake.requests]
    assert sent_first >= 3 and set(keys[:sent_first]) == {conversation_key(first)}
    assert set(keys[sent_first:]) == {conversation_key(second)} and conversation_key(first) != conversation_key(second)


async def test_a_completions_search_sends_the_affinity_header_and_none_by_default() -> None:
    conversation = Conversation.instruction("Say hi.")
    async with ToyCompletionsServer(eos_prob=0.0) as toy:  # nothing finishes early: every step is asked
        for affinity, want in (("x-session-affinity", conversation_key(conversation)), ("none", None)):
            toy.requests.clear()
            toy.affinity.clear()
            async with OpenAICompletionsUpstream(upstream_config(toy, cache_affinity=affinity)) as up:
                r = await search(conversation, up, FnScorer(words), CBS)
            assert len(r.steps) == 3 and len(toy.affinity) == len(toy.requests) >= 3
            assert set(toy.affinity) == {want}
            assert all("prompt_cache_key" not in body for body in toy.requests)
