"""The guided context check tokenizes the prompt (seconds for a megabyte on a real tokenizer): it
must not run on the event loop, and must not use a tokenizer beside the scorer's own worker.

No timings: the tokenizer is held inside the check by a threading.Event, so the check is
provably in progress while /health is asked.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from tiny_models import Loaded

from proxy.config import AppConfig, SearchConfig, ServerConfig
from proxy.presets import resolve_server
from proxy.serving.app import GuidanceServer
from proxy.testing.toy_server import ToyCompletionsServer
from scorers.implicit import ImplicitRewardScorer
from tests.conftest import on_any_port, upstream_config

BIG = 1 << 20


@asynccontextmanager
async def serving(toy: ToyCompletionsServer, scorer: Any) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    server = ServerConfig.model_validate(resolve_server({"max_body_bytes": 2 * BIG}))
    cfg = AppConfig(upstream=upstream_config(toy), search=SearchConfig(), server=server)
    async with GuidanceServer(on_any_port(cfg), scorer=scorer, shutdown_timeout_s=0.5) as srv, \
            aiohttp.ClientSession() as http:
        yield srv.base_url.removesuffix("/v1"), http


async def post(http: aiohttp.ClientSession, root: str, prompt: str, max_tokens: int = 8) -> tuple[int, dict]:
    body = {"model": "toy-instruct+bon4", "prompt": prompt, "max_tokens": max_tokens, "seed": 3}
    async with http.post(f"{root}/v1/completions", json=body) as r:
        return r.status, await r.json()


async def test_health_answers_while_a_big_guided_prompt_is_checked(llama_pair: tuple[Loaded, Loaded]) -> None:
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair)
    tuned = scorer.tuned
    tokenize = tuned._tokenize
    inside, release = threading.Event(), threading.Event()
    threads: set[str] = set()

    def held(text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > BIG // 2:
            threads.add(threading.current_thread().name)
            inside.set()
            release.wait(10)  # on the event loop (the old code), this froze everything meanwhile
        return tokenize(text, add_special_tokens)

    tuned._tokenize = held  # type: ignore[method-assign]
    async with ToyCompletionsServer() as toy, serving(toy, scorer) as (root, http):
        guided = asyncio.create_task(post(http, root, "word " * (BIG // 5)))
        assert await asyncio.to_thread(inside.wait, 10)  # the check is tokenizing the megabyte now
        async with http.get(f"{root}/health") as health:
            assert health.status == 200
        assert not guided.done()  # /health answered while the guided request was still being checked
        release.set()
        status, answer = await guided
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert threads and all(name.startswith("w2s-scorer") for name in threads)  # the scorer's own worker
    assert toy.requests == []
    await scorer.aclose()


async def test_big_prompts_beside_scoring_share_the_tokenizer_safely(llama_pair: tuple[Loaded, Loaded]) -> None:
    """Big-prompt checks and real searches at once: every big prompt is a clean 400, every search
    a 200 (no "Already borrowed" from a tokenizer used by two threads, no 500)."""
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair)
    async with ToyCompletionsServer() as toy, serving(toy, scorer) as (root, http):
        big = [post(http, root, f"{i} " + "lorem ipsum " * 20_000) for i in range(6)]
        small = [post(http, root, f"Tell me about item {i}.", 12) for i in range(4)]
        results = await asyncio.gather(*big, *small)
    for status, answer in results[:6]:
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    for status, answer in results[6:]:
        assert status == 200 and isinstance(answer["w2s"]["score"], float), answer
    assert len(toy.requests) == 4
    await scorer.aclose()


async def test_the_check_runs_on_the_scorers_worker(llama_pair: tuple[Loaded, Loaded]) -> None:
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair)
    name = await scorer.run_tokenizing(lambda: threading.current_thread().name)
    assert name.startswith("w2s-scorer")
    await scorer.aclose()
