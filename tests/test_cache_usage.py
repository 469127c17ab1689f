"""Usage that knows the provider's prompt cache, end to end: each family's reading of its
provider's cache fields (and of their absence), Usage arithmetic, cost at the cache rates,
budgets, and what the server, the `w2s` summary, /metrics and AlpacaEval report."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.alpaca_eval.checkpoint import CHECKPOINT_NAME, read_checkpoint
from proxy.alpaca_eval.outputs import ItemStats
from proxy.budget import Budget
from proxy.config import AnthropicConfig, AppConfig, OpenAIChatConfig, OpenAICompletionsConfig, Prices, SearchConfig
from proxy.config import ServerConfig
from proxy.cost import cost_usd
from proxy.engine import summarize
from proxy.presets import resolve_server
from proxy.search import SearchResult
from proxy.serving.app import GuidanceServer
from proxy.serving.metrics import ServerMetrics
from proxy.serving.site import listen
from proxy.testing.fake_anthropic import FakeAnthropicServer
from proxy.testing.fake_openai_chat import FakeChatServer
from proxy.types import Conversation, SamplingParams, Usage
from proxy.upstreams.anthropic_messages import AnthropicMessagesUpstream
from proxy.upstreams.openai_chat import OpenAIChatUpstream
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from proxy.upstreams.openai_http import usage_of
from proxy.upstreams.reading import ChatAnswer
from tests.conftest import on_any_port

CONV = Conversation.chat([{"role": "system", "content": "You tell short stories."},
                          {"role": "user", "content": "Tell me about a cat"}])
PARTIAL = " Once upon a time the cat"
PARAMS = SamplingParams(n=1, max_tokens=4, seed=3)


def read(usage: dict[str, Any] | None) -> Usage:
    """An OpenAI-style answer's usage as the OpenAI-compatible families read it."""
    body: dict[str, Any] = {"choices": [{"message": {"content": "x"}}]}
    if usage is not None:
        body["usage"] = usage
    return usage_of(ChatAnswer.model_validate(body).usage)


# ------------------------------------------------------------------------------ Usage and cost


def test_usage_keeps_its_two_field_form_and_adds_every_field() -> None:
    assert Usage(10, 2) == Usage(10, 2, 0, 0) and Usage(10, 2).uncached_prompt_tokens == 10
    total = Usage(100, 5, 60, 10) + Usage(50, 7, 20, 0)
    assert total == Usage(150, 12, 80, 10)
    assert (total.uncached_prompt_tokens, total.total_tokens) == (60, 162)
    assert total - Usage(50, 7, 20, 0) == Usage(100, 5, 60, 10)
    assert sum((Usage(1, 1, 1, 0), Usage(3, 0, 0, 2)), Usage()) == Usage(4, 1, 1, 2)


def test_cost_prices_uncached_cached_written_and_completion_tokens_at_their_rates() -> None:
    prices = Prices(prompt=3.0, completion=15.0, cached_prompt=0.3, cache_write=3.75)
    usage = Usage(prompt_tokens=10_000, completion_tokens=1_000, cached_tokens=6_000, cache_write_tokens=2_000)
    # by hand: 2,000 uncached × $3 + 6,000 read × $0.30 + 2,000 written × $3.75 + 1,000 out × $15, per million
    assert cost_usd(usage, prices) == pytest.approx((6_000 + 1_800 + 7_500 + 15_000) / 1e6)  # $0.0303
    # unset cache rates cost the prompt rate: every existing price list prices exactly as before
    plain = Prices(prompt=3.0, completion=15.0)
    assert cost_usd(usage, plain) == cost_usd(Usage(10_000, 1_000), plain) == pytest.approx(0.045)
    assert cost_usd(Usage(10_000, 1_000), prices) == pytest.approx(0.045)


def test_prices_refuse_negative_cache_rates() -> None:
    with pytest.raises(ValueError, match="cached_prompt"):
        Prices(prompt=1.0, cached_prompt=-0.1)


def test_budgets_charge_at_the_cache_rates_and_bound_a_step_at_the_write_rate() -> None:
    prices = Prices(prompt=1_000.0, completion=0.0, cached_prompt=100.0, cache_write=1_250.0)
    budget = Budget(max_usd=1.0, prices=prices)
    budget.charge(Usage(1_000, 0, cached_tokens=1_000))  # $0.10: read from the cache
    assert budget.spent == Usage(1_000, 0, 1_000, 0) and budget.allows(Usage(700, 0))
    # 800 unsplit prompt tokens may all be cache writes: $1.00 at most, over the $0.90 left
    assert not budget.allows(Usage(800, 0))
    assert Budget(max_usd=1.0, prices=Prices(prompt=1_000.0)).allows(Usage(1_000, 0))  # as before


# ------------------------------------------------------------------------------ each family's reading


@pytest.mark.parametrize(("usage", "expected"), [
    (None, Usage()),
    ({"prompt_tokens": 40, "completion_tokens": 5}, Usage(40, 5)),
    ({"prompt_tokens": 40, "completion_tokens": 5, "prompt_tokens_details": None}, Usage(40, 5)),
    ({"prompt_tokens": 40, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": None}}, Usage(40, 5)),
    ({"prompt_tokens": 40, "completion_tokens": 5, "prompt_tokens_details": {"audio_tokens": 0}}, Usage(40, 5)),
    # OpenAI, Mistral, Groq, vLLM --enable-prompt-tokens-details
    ({"prompt_tokens": 40, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 32}},
     Usage(40, 5, 32, 0)),
    # OpenRouter: writes too
    ({"prompt_tokens": 40, "completion_tokens": 5,
      "prompt_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 20}}, Usage(40, 5, 16, 20)),
    # DeepSeek: hit + miss is the prompt; the hit is cached (preferred over prompt_tokens_details)
    ({"prompt_tokens": 40, "completion_tokens": 5, "prompt_cache_hit_tokens": 30, "prompt_cache_miss_tokens": 10,
      "prompt_tokens_details": {"cached_tokens": 29}}, Usage(40, 5, 30, 0)),
    ({"prompt_tokens": 41, "completion_tokens": 5, "prompt_cache_hit_tokens": 30, "prompt_cache_miss_tokens": 10},
     Usage(40, 5, 30, 0)),
    ({"prompt_tokens": 40, "completion_tokens": 5, "prompt_cache_hit_tokens": 30}, Usage(40, 5, 30, 0)),
    ({"prompt_tokens": 40, "completion_tokens": 5, "prompt_cache_hit_tokens": None,
      "prompt_cache_miss_tokens": None}, Usage(40, 5)),
    # never more cached than billed
    ({"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 64}},
     Usage(10, 1, 10, 0)),
])
def test_openai_style_usage_reading(usage: dict[str, Any] | None, expected: Usage) -> None:
    assert read(usage) == expected


@pytest.mark.parametrize("dialect", ["vllm", "deepseek", "mistral", "ignores-n"])
async def test_each_chat_dialect_reports_a_repeated_prefix_as_cached(dialect: str) -> None:
    seed_param = {"mistral": "random_seed"}.get(dialect, "seed")
    continuation = "prefix" if dialect in ("deepseek", "mistral") else "continue_final_message"
    async with FakeChatServer(dialect, prompt_tokens_details=True) as server:  # type: ignore[arg-type]
        cfg = OpenAIChatConfig(model="toy-chat", base_url=server.base_url, seed_param=seed_param,
                               continuation=continuation, timeout_s=10.0)
        async with OpenAIChatUpstream(cfg) as up:
            first = await up.sample(CONV, PARTIAL, PARAMS)
            second = await up.sample(CONV, PARTIAL + " sat", PARAMS)
        bodies = [r["usage"] for r in server.responses if r is not None]
    prompt1, prompt2 = (b["prompt_tokens"] for b in bodies)
    assert first.usage.prompt_tokens == prompt1 and second.usage.prompt_tokens == prompt2
    assert first.usage.cached_tokens == 0 and 0 < second.usage.cached_tokens < prompt2
    shared = second.usage.cached_tokens
    if dialect == "deepseek":
        assert bodies[1]["prompt_cache_hit_tokens"] == shared
        assert bodies[1]["prompt_cache_miss_tokens"] == prompt2 - shared
    else:
        assert bodies[1]["prompt_tokens_details"]["cached_tokens"] == shared
    writes = (prompt1, prompt2 - shared) if dialect == "ignores-n" else (0, 0)
    assert (first.usage.cache_write_tokens, second.usage.cache_write_tokens) == writes
    assert up.usage == first.usage + second.usage


async def test_vllm_without_prompt_tokens_details_reports_all_prompt_tokens_uncached() -> None:
    async with FakeChatServer("vllm") as server:
        cfg = OpenAIChatConfig(model="toy-chat", base_url=server.base_url, timeout_s=10.0)
        async with OpenAIChatUpstream(cfg) as up:
            await up.sample(CONV, PARTIAL, PARAMS)
            res = await up.sample(CONV, PARTIAL, PARAMS)
    assert "prompt_tokens_details" not in server.responses[1]["usage"]  # type: ignore[index]
    assert res.usage.cached_tokens == 0 and res.usage.uncached_prompt_tokens == res.usage.prompt_tokens > 0


async def fireworks_like(header: str | None) -> AsyncIterator[str]:
    """A completions server that answers like Fireworks: the cache count only in a header."""
    async def completions(request: web.Request) -> web.Response:
        body = {"choices": [{"index": 0, "text": " the end", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 2, "total_tokens": 52}}
        return web.json_response(body, headers={"fireworks-cached-prompt-tokens": header} if header else None)

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner, root = await listen(app, "127.0.0.1", 0, shutdown_timeout=0.5, access_log=None)
    try:
        yield f"{root}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("header", "cached"), [("48", 48), (None, 0), ("n/a", 0)])
async def test_fireworks_cached_prompt_tokens_header_is_read(header: str | None, cached: int) -> None:
    async for base_url in fireworks_like(header):
        cfg = OpenAICompletionsConfig(model="m", base_url=base_url, timeout_s=10.0, supports_n=True)
        async with OpenAICompletionsUpstream(cfg) as up:
            res = await up.sample(Conversation.instruction("hi"), "", PARAMS)
    assert res.usage == Usage(50, 2, cached, 0)


async def test_anthropic_cache_reads_and_writes_count_in_the_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ANTHROPIC_KEY", "k")
    async with FakeAnthropicServer(api_key="k") as fake:
        cfg = AnthropicConfig(model="claude-opus-4-5", base_url=fake.base_url, api_key_env="FAKE_ANTHROPIC_KEY",
                              timeout_s=10.0, extra_body={"cache_control": {"type": "ephemeral"}})
        plain = AnthropicConfig(model="claude-opus-4-5", base_url=fake.base_url, api_key_env="FAKE_ANTHROPIC_KEY",
                                timeout_s=10.0)
        async with AnthropicMessagesUpstream(cfg) as up:
            wrote = await up.sample(CONV, "Once upon a time", PARAMS)
            reads = await up.sample(CONV, "Once upon a time", PARAMS)
        async with AnthropicMessagesUpstream(plain) as up2:
            none = await up2.sample(CONV, "Once upon a time", PARAMS)
    prompt = wrote.usage.prompt_tokens
    assert prompt > 0 and wrote.usage == Usage(prompt, wrote.usage.completion_tokens, 0, prompt)
    assert reads.usage == Usage(prompt, reads.usage.completion_tokens, prompt, 0)
    assert none.usage == Usage(prompt, none.usage.completion_tokens, 0, 0)


def test_anthropic_usage_of_a_message_with_and_without_cache_fields() -> None:
    from anthropic.types import Message

    from proxy.upstreams.anthropic_messages import usage_of as anthropic_usage

    def message(**usage: Any) -> Message:
        return Message.model_validate({"id": "m", "type": "message", "role": "assistant", "model": "c",
                                       "content": [], "stop_reason": "end_turn", "stop_sequence": None,
                                       "usage": usage})

    assert anthropic_usage(message(input_tokens=12, output_tokens=3)) == Usage(12, 3)
    assert anthropic_usage(message(input_tokens=12, output_tokens=3, cache_read_input_tokens=None,
                                   cache_creation_input_tokens=None)) == Usage(12, 3)
    assert anthropic_usage(message(input_tokens=12, output_tokens=3, cache_read_input_tokens=2048,
                                   cache_creation_input_tokens=100)) == Usage(2160, 3, 2048, 100)


# ------------------------------------------------------------------------------ reported


async def test_server_usage_summary_and_metrics_carry_the_cache_split() -> None:
    prices = Prices(prompt=2.0, completion=6.0, cached_prompt=0.2)
    async with FakeChatServer("mistral") as fake:
        upstream = OpenAIChatConfig(model="toy-chat", base_url=fake.base_url, seed_param="random_seed",
                                    continuation="prefix", timeout_s=10.0, prices=prices)
        cfg = AppConfig(upstream=upstream, search=SearchConfig(),
                        server=ServerConfig.model_validate(resolve_server({})))
        async with GuidanceServer(on_any_port(cfg), shutdown_timeout_s=0.5) as server:
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
            try:
                answers = [await client.chat.completions.create(model="toy-chat", messages=list(CONV.messages),
                                                                max_tokens=5, seed=1) for _ in range(2)]
            finally:
                await client.close()
            async with aiohttp.ClientSession() as s, s.get(server.base_url.removesuffix("/v1") + "/metrics") as r:
                text = await r.text()
    first, second = (a.usage for a in answers)
    assert first is not None and second is not None
    assert first.prompt_tokens_details is not None and second.prompt_tokens_details is not None
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens == second.prompt_tokens > 0  # the same prompt again
    summary = answers[1].model_extra["w2s"]  # type: ignore[index]
    assert (summary["cached_tokens"], summary["cache_write_tokens"]) == (second.prompt_tokens, 0)
    assert summary["cost_usd"] == pytest.approx((second.prompt_tokens * 0.2 + second.completion_tokens * 6.0) / 1e6)

    def metric(kind: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "w2s_upstream_tokens_total" and s.labels.get("kind") == kind)

    assert metric("prompt_cached") == second.prompt_tokens
    assert metric("prompt_uncached") == first.prompt_tokens
    assert metric("cache_write") == 0
    assert metric("completion") == first.completion_tokens + second.completion_tokens


def test_metrics_count_each_token_kind() -> None:
    from proxy.search import StepTrace

    m = ServerMetrics(process=False)
    m.observe_step(StepTrace(step=0, expanded=[], candidates=[], carried=[], survivors=[],
                             usage=Usage(100, 7, 60, 30), calls=1, upstream_s=0.0, scoring_s=0.0, wall_s=0.0), 0.0)
    counts = {kind: m.total("w2s_upstream_tokens_total", kind=kind)
              for kind in ("prompt_uncached", "prompt_cached", "cache_write", "completion")}
    assert counts == {"prompt_uncached": 10, "prompt_cached": 60, "cache_write": 30, "completion": 7}


def test_summary_carries_cached_and_written_tokens() -> None:
    result = SearchResult(text="t", finished=True, score=None, tokens=3, config=None, mode="base",
                          usage=Usage(100, 3, 80, 5))
    s = summarize(result, Prices(prompt=1.0, completion=1.0, cached_prompt=0.5, cache_write=2.0))
    assert (s.prompt_tokens, s.cached_tokens, s.cache_write_tokens, s.completion_tokens) == (100, 80, 5, 3)
    assert s.cost_usd == pytest.approx((15 * 1.0 + 80 * 0.5 + 5 * 2.0 + 3 * 1.0) / 1e6)


def test_an_old_checkpoint_without_cache_fields_still_loads(tmp_path: Path) -> None:
    header = {"kind": "header", "version": 1, "fingerprint": "f", "generator": "g", "created": 0.0}
    item = {"kind": "item", "index": 0, "instruction": "i", "dataset": "d", "status": "ok", "output": "o",
            "steps": 1, "calls": 1, "tokens": 2, "prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 0.0,
            "wall_s": 0.1, "at": 0.0}
    (tmp_path / CHECKPOINT_NAME).write_text(json.dumps(header) + "\n" + json.dumps(item) + "\n")
    state = read_checkpoint(tmp_path)
    [rec] = state.done.values()
    assert (rec.prompt_tokens, rec.cached_tokens, rec.cache_write_tokens) == (10, 0, 0)
    stats = ItemStats.of([rec, rec.model_copy(update={"cached_tokens": 4, "cache_write_tokens": 1})])
    assert (stats.prompt_tokens, stats.cached_tokens, stats.cache_write_tokens) == (20, 4, 1)
