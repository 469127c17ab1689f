"""Anthropic prompt-cache breakpoints (issue 24, item 2): a search's later requests read what its
earlier ones wrote, one request of a beam's K parallel twins pays each write, nothing is marked
under the model's minimum, and nothing at all without `prompt_caching`. Against the fake, whose
cache follows Anthropic's documented rules (marks at block boundaries, minimum prefix, an entry
readable only after the request that wrote it arrived first)."""
from __future__ import annotations

from typing import Any

import pytest

from proxy.config import SearchConfig
from proxy.search import search
from proxy.testing.fake_anthropic import FakeAnthropicServer
from proxy.types import Conversation
from proxy.upstreams.anthropic_messages import AnthropicMessagesUpstream
from tests.doubles import FnScorer
from tests.test_anthropic_upstream import KEY, config

CONVERSATION = Conversation.chat([{"role": "system", "content": "You are a careful film critic. " * 4},
                                  {"role": "user", "content": "Review a quiet film about a lighthouse keeper."}])
CBS = SearchConfig(w=2, k=2, l=4, max_new_tokens=12, seed=3)


@pytest.fixture(autouse=True)
def anthropic_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


def words(text: str, finished: bool) -> float:
    return float(len(set(text.split())))


def marks(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of every block carrying cache_control, in order."""
    out = []
    for m in body["messages"]:
        if isinstance(m["content"], list):
            out.extend((m["role"], b["text"]) for b in m["content"] if "cache_control" in b)
    return out


def writes(body: dict[str, Any]) -> bool:
    """Does the request write its whole prompt: a mark on the final block of its final turn?"""
    content = body["messages"][-1]["content"]
    return isinstance(content, list) and "cache_control" in content[-1]


def prefill(body: dict[str, Any]) -> str:
    last = body["messages"][-1]
    if last["role"] != "assistant":
        return ""
    return last["content"] if isinstance(last["content"], str) else "".join(b["text"] for b in last["content"])


async def test_a_search_writes_each_prefix_once_and_reads_it_after() -> None:
    async with FakeAnthropicServer(api_key=KEY) as fake:
        async with AnthropicMessagesUpstream(config(fake, prompt_caching=True, cache_min_tokens=0)) as up:
            r = await search(CONVERSATION, up, FnScorer(words), CBS)
    bodies = [b for b in fake.requests]
    assert len(r.steps) == 3 and len(bodies) == 4 + 4 + 4
    user = CONVERSATION.messages[-1]["content"]
    # step 1: one of the W*K first requests writes the conversation; its twins mark nothing
    first = [marks(b) for b in bodies[:4]]
    assert sorted(first, key=len) == [[], [], [], [("user", user)]] and sum(map(writes, bodies[:4])) == 1
    assert r.steps[0].usage.cached_tokens == 0 and r.steps[0].usage.cache_write_tokens > 0
    # later steps: every request reads the conversation; per beam exactly one request writes its prefill
    for step, chunk in ((2, bodies[4:8]), (3, bodies[8:12])):
        by_prefill: dict[str, list[bool]] = {}
        for b in chunk:
            assert marks(b)[0] == ("user", user)
            by_prefill.setdefault(prefill(b), []).append(writes(b))
        assert sorted(map(sorted, by_prefill.values())) == [[False, True], [False, True]], step
        usage = r.steps[step - 1].usage
        assert usage.cached_tokens > 0 and usage.cache_write_tokens > 0
    # at step 3 each request reads its parent beam's prefill, written at step 2
    parents = {prefill(b) for b in bodies[4:8]}
    for b in bodies[8:12]:
        read = [text for role, text in marks(b) if role == "assistant"][0]
        assert read in parents and prefill(b).startswith(read) and prefill(b) != read
    assert r.usage.cached_tokens > r.usage.cache_write_tokens


async def test_nothing_is_marked_under_the_minimum_or_without_prompt_caching() -> None:
    async with FakeAnthropicServer(api_key=KEY) as fake:
        for settings in ({"prompt_caching": True, "cache_min_tokens": 10_000}, {}):
            fake.requests.clear()
            async with AnthropicMessagesUpstream(config(fake, **settings)) as up:
                r = await search(CONVERSATION, up, FnScorer(words), CBS)
            assert fake.requests and all(marks(b) == [] for b in fake.requests)
            assert all(isinstance(b["messages"][-1]["content"], str) for b in fake.requests)
            assert r.usage.cached_tokens == r.usage.cache_write_tokens == 0


async def test_a_one_hour_ttl_is_sent_as_such() -> None:
    async with FakeAnthropicServer(api_key=KEY) as fake:
        async with AnthropicMessagesUpstream(config(fake, prompt_caching=True, cache_min_tokens=0,
                                                    cache_ttl="1h")) as up:
            await search(CONVERSATION, up, FnScorer(words), CBS)
    controls = [blk["cache_control"] for b in fake.requests for m in b["messages"] if isinstance(m["content"], list)
                for blk in m["content"] if "cache_control" in blk]
    assert controls and all(c == {"type": "ephemeral", "ttl": "1h"} for c in controls)
