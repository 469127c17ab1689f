"""The search seam: an algorithm defined and registered here, in this test module alone, is
served through the server (plain and streamed), the Python client and the CLI, and refused
cleanly where it cannot run. Its answers are checked against the upstream asked directly."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from proxy.cli import main
from proxy.client import GuidedClient
from proxy.config import AppConfig, ConfigError, SearchConfig, ServerConfig
from proxy.search import Candidate, SearchAlgorithm, StepTrace, mode_name, register, unregister
from proxy.serving.app import GuidanceServer
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.types import Usage, derive_seed
from tests.conftest import on_any_port, upstream_config

MODEL = "toy-instruct"


class Longest(SearchAlgorithm):
    """Sample K whole answers in one request and keep the longest: ranks without a scorer."""

    @classmethod
    def label(cls, cfg: Any) -> str:
        return f"longest{cfg.k}"

    @classmethod
    def needs_scorer(cls, cfg: Any) -> bool:
        return False

    @classmethod
    def first_step_bound(cls, cfg: Any) -> Usage:
        return Usage(0, cfg.k * cfg.max_new_tokens)

    def live(self) -> list[Candidate]:
        return [] if self.steps else [self.nodes[0]]

    def next_step_bound(self, live: list[Candidate]) -> Usage:
        return self.first_step_bound(self.cfg)

    async def step(self, number: int, live: list[Candidate]) -> tuple[StepTrace, list[Candidate]]:
        out = await self.expand(live, [0], number, self.cfg.k, self.cfg.max_new_tokens)
        best = max(out.candidates, key=lambda c: (len(c.text), -c.id))
        best.survived = True
        self.best = best
        return StepTrace(number, [0], out.candidates, [], [best.id], out.usage, out.calls, out.upstream_s,
                         out.scoring_s, out.upstream_s + out.scoring_s), [best]

    def answer(self) -> Candidate:
        return getattr(self, "best", self.nodes[0])


@pytest.fixture(autouse=True)
def longest() -> Iterator[None]:
    register("longest", Longest)
    yield
    unregister("longest")


async def expected_longest(server: ToyCompletionsServer, prompt: str, k: int, max_tokens: int, seed: int) -> str:
    """The answer computed independently: the same request sent straight to the upstream."""
    direct = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    try:
        r = await direct.completions.create(model=MODEL, prompt=prompt, n=k, max_tokens=max_tokens,
                                            temperature=0.7, seed=derive_seed(seed, 1, 0))
    finally:
        await direct.close()
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    return max(texts, key=len)


async def test_served_by_name_per_request_and_as_a_mode(loopback: ToyCompletionsServer) -> None:
    server_cfg = ServerConfig.model_validate({"modes": {"long": {"algorithm": "longest", "k": 3,
                                                                 "max_new_tokens": 9}}})
    cfg = AppConfig(upstream=upstream_config(loopback), server=server_cfg)
    async with GuidanceServer(on_any_port(cfg), shutdown_timeout_s=0.5) as served:
        client = openai.AsyncOpenAI(base_url=served.base_url, api_key="x", max_retries=0)
        try:
            models = [m.id async for m in client.models.list()]
            by_field = await client.completions.create(
                model=MODEL, prompt="Once", max_tokens=9, seed=4, extra_body={"w2s": {"algorithm": "longest", "k": 3}})
            by_mode = await client.completions.create(model=f"{MODEL}+long", prompt="Once", seed=4)
            stream = await client.completions.create(model=f"{MODEL}+long", prompt="Once", seed=4, stream=True)
            streamed = "".join([c.choices[0].text async for c in stream if c.choices])
            with pytest.raises(openai.BadRequestError) as bad:
                await client.completions.create(model=MODEL, prompt="Once", extra_body={"w2s": {"algorithm": "nope"}})
        finally:
            await client.close()
    want = await expected_longest(loopback, "Once", 3, 9, 4)
    assert f"{MODEL}+long" in models
    assert by_field.choices[0].text == by_mode.choices[0].text == streamed == want
    assert by_field.model_extra["w2s"]["mode"] == "longest3" and by_mode.model_extra["w2s"]["mode"] == "long"
    assert by_field.model_extra["w2s"]["steps"] == 1
    assert bad.value.body["param"] == "w2s.algorithm" and "unknown algorithm 'nope'" in bad.value.body["message"]


async def test_the_client_runs_it_and_refuses_an_unknown_one(loopback: ToyCompletionsServer) -> None:
    cfg = AppConfig(upstream=upstream_config(loopback), search=SearchConfig(algorithm="longest", k=4,
                                                                            max_new_tokens=7, seed=2))
    async with GuidedClient(cfg) as client:
        r = await client.complete("Once")
        with pytest.raises(ConfigError, match="search.algorithm: unknown algorithm 'nope'"):
            await client.complete("Once", algorithm="nope")
    assert r.mode == mode_name(cfg.search) == "longest4"
    assert r.text == await expected_longest(loopback, "Once", 4, 7, 2)
    assert len(r.steps[0].candidates) == 4 and r.steps[0].survivors == [r.chosen]


async def test_the_cli_offers_it_through_the_algorithm_flag(loopback: ToyCompletionsServer, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({"upstream": {"model": MODEL, "base_url": loopback.base_url},
                                      "search": {"max_new_tokens": 8, "seed": 6}}))
    argv = ["generate", "--config", str(config), "--raw", "--json", "--algorithm", "longest", "--k", "3", "Once"]
    assert await asyncio.to_thread(main, argv) == 0  # the CLI runs its own event loop
    printed = json.loads(capsys.readouterr().out)
    assert printed["mode"] == "longest3" and printed["score"] is None
    assert printed["text"] == await expected_longest(loopback, "Once", 3, 8, 6)
    assert await asyncio.to_thread(main, [*argv[:-1], "--algorithm", "nope", "Once"]) == 2
