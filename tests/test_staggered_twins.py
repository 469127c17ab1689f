"""`upstream.stagger_twins`: where one prompt's K samples are K requests, the first goes alone and
its twins once it has answered, so they read the cache entry it wrote; off (the default), all K
at once and no twin reads another's. The samples are the same either way. Against the fakes,
whose caches hold only what was written before a request arrived (DeepSeek's units, Anthropic's
breakpoints), with a latency so that parallel requests overlap."""
from __future__ import annotations

import asyncio

import pytest

from proxy.config import OpenAIChatConfig
from proxy.testing.fake_anthropic import FakeAnthropicServer
from proxy.testing.fake_openai_chat import FakeChatServer
from proxy.types import Conversation, SamplingParams, sample_seed
from proxy.upstreams.anthropic_messages import AnthropicMessagesUpstream
from proxy.upstreams.capability import Capability, n_choices
from proxy.upstreams.openai_chat import OpenAIChatUpstream
from tests.test_anthropic_upstream import KEY, config

CONV = Conversation.chat([{"role": "system", "content": "You are a careful film critic. " * 4},
                          {"role": "user", "content": "Review a quiet film about a lighthouse keeper."}])
PARAMS = SamplingParams(n=4, max_tokens=6, seed=5)


@pytest.mark.parametrize("stagger", [False, True])
async def test_the_first_request_goes_alone_then_its_twins_together(stagger: bool) -> None:
    events: list[str] = []

    async def ask(k: int, seed: int | None) -> int | None:
        events.append(f"start {seed}")
        await asyncio.sleep(0.01)
        events.append(f"end {seed}")
        return seed

    seeds = await n_choices(4, 9, Capability("n>1", "t", known=False), ask, lambda r: 1, lambda e: False,
                            stagger=stagger)
    assert seeds == [sample_seed(9, i) for i in range(4)]
    starts = [e for e in events[:4] if e.startswith("start")]
    if stagger:
        assert events[:3] == [f"start {seeds[0]}", f"end {seeds[0]}", f"start {seeds[1]}"]
    else:
        assert len(starts) == 4  # all sent before any answered


@pytest.mark.parametrize("stagger", [False, True])
async def test_deepseek_twins_read_what_the_first_wrote_only_when_staggered(stagger: bool) -> None:
    async with FakeChatServer("deepseek", latency_s=0.05) as fake:
        cfg = OpenAIChatConfig(model="toy-chat", base_url=fake.base_url, continuation="prefix", supports_n=False,
                               timeout_s=10.0, stagger_twins=stagger)
        async with OpenAIChatUpstream(cfg) as up:
            result = await up.sample(CONV, "", PARAMS)
    hits = [r["usage"]["prompt_cache_hit_tokens"] for r in fake.responses if r is not None]
    prompt = fake.responses[0]["usage"]["prompt_tokens"]  # type: ignore[index]
    assert len(hits) == 4 and hits == ([0, prompt, prompt, prompt] if stagger else [0, 0, 0, 0])
    assert result.usage.cached_tokens == sum(hits) and len(result.continuations) == 4


async def test_the_samples_do_not_depend_on_staggering() -> None:
    texts = []
    for stagger in (False, True):
        async with FakeChatServer("deepseek", latency_s=0.02) as fake:
            cfg = OpenAIChatConfig(model="toy-chat", base_url=fake.base_url, continuation="prefix",
                                   supports_n=False, timeout_s=10.0, stagger_twins=stagger)
            async with OpenAIChatUpstream(cfg) as up:
                texts.append([c.text for c in (await up.sample(CONV, "", PARAMS)).continuations])
    assert texts[0] == texts[1] and len(texts[0]) == 4


@pytest.mark.parametrize("stagger", [False, True])
async def test_anthropic_twins_mark_and_read_the_new_prefix_only_when_staggered(stagger: bool,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    async with FakeAnthropicServer(api_key=KEY, latency_s=0.05) as fake:
        async with AnthropicMessagesUpstream(config(fake, prompt_caching=True, cache_min_tokens=0,
                                                    stagger_twins=stagger)) as up:
            result = await up.sample(CONV, "", SamplingParams(n=3, max_tokens=4, seed=2))
    assert result.usage.cache_write_tokens > 0
    written = result.usage.cache_write_tokens
    marked = [any("cache_control" in b for m in body["messages"] if isinstance(m["content"], list)
                  for b in m["content"]) for body in fake.requests]
    if stagger:  # one write, then two reads of it
        assert marked == [True, True, True] and result.usage.cached_tokens == 2 * written
    else:  # the twins could not read it: they mark nothing
        assert sorted(marked) == [False, False, True] and result.usage.cached_tokens == 0
