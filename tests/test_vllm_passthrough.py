"""Plain-mode passthrough against the real vLLM server (its CPU build, tests/vllm_engine.py): a
request with what only the engine can do (logprobs, n > 1, a JSON schema), sent through the
proxy with the openai SDK, gets the answer vLLM itself gives the same seeded body, whole and
streamed (proxy.serving.passthrough)."""
from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from proxy.config import AppConfig, SearchConfig
from proxy.upstreams.openai_chat import OpenAIChatUpstream
from tests.test_server import served
from tests.vllm_engine import SERVED_NAME, VllmServer

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Name a colour."}]


def choices(answer: Any) -> list[tuple[str | None, list[tuple[str, float]] | None]]:
    """Each choice's text and its tokens' logprobs (rounded: the same sampler, two runs)."""
    out = []
    for c in answer.choices:
        probs = [(t.token, round(t.logprob, 3)) for t in c.logprobs.content] if c.logprobs else None
        out.append((c.message.content, probs))
    return out


async def test_what_only_the_engine_can_do_comes_back_as_the_engine_answers(vllm_server: VllmServer) -> None:
    cfg = vllm_server.config("openai-chat")
    body: dict[str, Any] = dict(model=SERVED_NAME, messages=ASK, n=2, seed=7, max_tokens=8, temperature=1.0,
                                logprobs=True, top_logprobs=2)
    async with OpenAIChatUpstream(cfg) as up, served(AppConfig(upstream=cfg, search=SearchConfig()),
                                                     upstream=up) as (_, client):
        direct = openai.AsyncOpenAI(base_url=cfg.base_url, api_key="unused", max_retries=0)
        try:
            mine, theirs = await client.chat.completions.create(**body), await direct.chat.completions.create(**body)
            stream = await client.chat.completions.create(**body, stream=True,
                                                          stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
                      "additionalProperties": False}
            shaped = await client.chat.completions.create(
                model=SERVED_NAME, messages=ASK, max_tokens=40, seed=1, temperature=0.0,
                response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        finally:
            await direct.close()
    assert len(mine.choices) == 2 and choices(mine) == choices(theirs)
    assert mine.usage == theirs.usage
    streamed = {i: "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == i)
                for i in (0, 1)}
    assert streamed == {i: c.message.content for i, c in enumerate(mine.choices)}
    assert [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks if c.usage] == [
        (mine.usage.prompt_tokens, mine.usage.completion_tokens)]
    assert shaped.choices[0].finish_reason == "stop"  # the engine held the answer to the schema
    assert set(json.loads(shaped.choices[0].message.content or "")) == {"colour"}
