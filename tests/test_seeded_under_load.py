"""A seeded guided request gives the same answer whatever else the server is doing: alone, and
again while many other searches (other prompts, other seeds, unseeded) share its upstream, its
scorer's micro-batches and its event loop. The scorer is a real (tiny) pair, so its batches really
mix requests; only fp32 noise in the scores may differ (padded shapes depend on what arrives
together), never the text chosen."""
from __future__ import annotations

import asyncio

import pytest

from proxy.config import AppConfig, ScorerConfig, SearchConfig, ServerConfig
from proxy.testing.toy_server import ToyCompletionsServer
from tests.conftest import upstream_config
from tests.test_server import served

PROMPTS = [f"Tell me about the {w} in the garden" for w in ("cat", "dog", "fox", "owl", "bee", "ant")]


async def test_a_seeded_guided_request_is_the_same_alone_and_under_load(
        loopback: ToyCompletionsServer, tiny_scorer_config: ScorerConfig) -> None:
    cbs = SearchConfig(w=2, k=2, l=8, max_new_tokens=24)
    cfg = AppConfig(upstream=upstream_config(loopback), scorer=tiny_scorer_config,
                    server=ServerConfig(modes={"cbs": cbs}))
    async with served(cfg) as (server, client):
        await server.wait_ready()

        async def ask(prompt: str, seed: int | None) -> tuple[str, float]:
            r = await client.completions.create(model="toy-instruct+cbs", prompt=prompt, max_tokens=24, seed=seed)
            return r.choices[0].text, r.model_extra["w2s"]["score"]  # type: ignore[index]

        alone = [await ask(p, 7) for p in PROMPTS[:2]]
        # The same two requests inside a crowd of 22 others, all in flight together.
        crowd = [ask(p, s) for s in (1, 2, None) for p in PROMPTS] + [ask(PROMPTS[5], 8) for _ in range(4)]
        loaded = await asyncio.gather(ask(PROMPTS[0], 7), *crowd, ask(PROMPTS[1], 7))
    assert [loaded[0][0], loaded[-1][0]] == [t for t, _ in alone]
    assert [loaded[0][1], loaded[-1][1]] == pytest.approx([s for _, s in alone], abs=1e-4)
    same = [t for t, _ in loaded[1 + 3 * len(PROMPTS):-1]]
    assert len(set(same)) == 1  # four copies of one seeded request, together, agree with each other
