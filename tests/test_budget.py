"""Budgets: a search, an API key and an evaluation run never spend more than they were given, and
say so when a budget ended their work."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest

from proxy.alpaca_eval.dataset import Instruction, select
from proxy.alpaca_eval.outputs import OUTPUTS_NAME
from proxy.alpaca_eval.runner import run_alpaca_eval
from proxy.budget import Budget
from proxy.client import GuidedClient
from proxy.config import AppConfig, Prices, SearchConfig
from proxy.cost import cost_usd
from proxy.search import search
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import upstream_config
from tests.doubles import FnScorer
from tests.test_server import MODEL, app_config, served


def words(text: str, finished: bool) -> float:
    return float(len(set(text.split())))


CBS = SearchConfig(w=2, k=2, l=4, max_new_tokens=40, temperature=1.0, seed=5)


async def test_a_capped_search_stops_before_the_step_that_would_pass_its_cap(loopback: ToyCompletionsServer) -> None:
    async with OpenAICompletionsUpstream(upstream_config(loopback)) as up:
        free = await search("the cat sat", up, FnScorer(words), CBS)
        for cap in (free.usage.total_tokens // 5, free.usage.total_tokens // 2, free.usage.total_tokens * 4 // 5):
            budget = Budget(max_tokens=cap)
            capped = await search("the cat sat", up, FnScorer(words), CBS, budget=budget)
            assert capped.stopped_by == "budget" and capped.usage.total_tokens <= cap
            assert budget.spent == capped.usage
            # what it did is what the free search did, up to where it stopped
            assert [sorted(c.text for c in s.candidates) for s in capped.steps] == \
                   [sorted(c.text for c in s.candidates) for s in free.steps[:len(capped.steps)]]
            assert capped.text == max((b for b in capped.nodes.values() if b.survived),
                                      key=lambda b: b.score or 0.0).text or not capped.steps
        parent = Budget(max_tokens=100)
        child = Budget(max_tokens=10_000, parent=parent)
        nested = await search("the cat sat", up, FnScorer(words), CBS, budget=child)
    assert free.stopped_by is None
    assert nested.stopped_by == "shared budget" and parent.spent.total_tokens <= 100


async def test_dollars_cap_a_request_and_the_answer_says_so(loopback: ToyCompletionsServer) -> None:
    prices = Prices(prompt=1000.0, completion=2000.0)  # dollars per million tokens: a few cents per search
    cfg = app_config(loopback, prices=prices.model_dump(),
                     server={"modes": {"cbs": CBS.model_dump()}, "caps": {"min_l": 4}})
    async with served(cfg, scorer=FnScorer(words)) as (srv, client):
        r = await client.completions.create(model=f"{MODEL}+cbs", prompt="the cat sat", max_tokens=40,
                                            extra_body={"w2s": {"max_cost_usd": 0.08}})
        free = await client.completions.create(model=f"{MODEL}+cbs", prompt="the cat sat", max_tokens=40)
    w2s = r.model_extra["w2s"]
    assert w2s["stopped_by"] == "budget" and w2s["cost_usd"] <= 0.08 and r.choices[0].finish_reason == "length"
    assert free.model_extra["w2s"]["stopped_by"] is None and free.model_extra["w2s"]["cost_usd"] > 0.08


async def test_each_proxy_key_has_its_own_budget(loopback: ToyCompletionsServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W2S_TEST_KEYS", "key-a,key-b")
    cfg = app_config(loopback, server={"api_keys_env": "W2S_TEST_KEYS", "key_budget_tokens": 60,
                                       "modes": {"cbs": CBS.model_dump()}, "caps": {"min_l": 4}})
    answers = []
    async with served(cfg, scorer=FnScorer(words), api_key="key-a") as (srv, client):
        with pytest.raises(openai.RateLimitError) as spent:
            for _ in range(20):  # until key-a cannot pay for another first step
                answers.append(await client.completions.create(model=f"{MODEL}+cbs", prompt="the cat sat",
                                                               max_tokens=40))
        other = await client.with_options(api_key="key-b").completions.create(
            model=MODEL, prompt="the dog ran", max_tokens=4)
    assert answers and answers[0].model_extra["w2s"]["stopped_by"] == "shared budget"
    assert sum(a.usage.total_tokens for a in answers) <= 60
    assert spent.value.body["code"] == "insufficient_quota" and "key-a" not in json.dumps(spent.value.body)
    assert other.choices


async def test_a_run_budget_stops_starting_items_and_the_next_run_finishes_them(tmp_path: Path) -> None:
    items = [Instruction(instruction=f"Describe thing number {i}.", dataset="d") for i in range(12)]
    prices = Prices(prompt=1000.0, completion=2000.0)
    async with ToyCompletionsServer() as server:
        cfg = AppConfig(upstream=upstream_config(server, prices=prices.model_dump()),
                        search=SearchConfig(w=2, k=2, l=4, max_new_tokens=12, seed=3))
        async with GuidedClient(cfg, scorer=FnScorer(words)) as client:
            whole = await run_alpaca_eval(client, select(items, "t"), tmp_path / "whole", progress=False)
            billed = client.usage.usage
            first = await run_alpaca_eval(client, select(items, "t"), tmp_path / "run", concurrency=2,
                                          progress=False, max_cost_usd=0.3)
            spent = cost_usd(client.usage.usage - billed, prices)
            second = await run_alpaca_eval(client, select(items, "t"), tmp_path / "run", progress=False)
    assert whole.complete and not first.complete and 0 < first.this_run.answered < 12
    assert spent <= 0.3 + 0.1  # one step per item in flight may pass the cap (two in flight here)
    assert second.complete and second.resumed == first.this_run.answered
    read = lambda d: json.loads((tmp_path / d / OUTPUTS_NAME).read_text())  # noqa: E731
    assert read("run") == read("whole")  # the items the budget stopped were redone, the same


async def test_a_deadline_answers_with_the_best_beam_so_far_and_cancels_the_step_in_flight() -> None:
    async with ToyCompletionsServer(latency_s=0.3) as slow:
        async with OpenAICompletionsUpstream(upstream_config(slow)) as up:
            cfg = CBS.model_copy(update={"deadline_s": 1.0})  # ten steps of 0.3 s each would take 3 s
            r = await search("the cat sat", up, FnScorer(words), cfg)
            free = await search("the cat sat", up, FnScorer(words), CBS)
        await asyncio.sleep(0.05)  # the cancelled step's handlers notice the disconnect
        in_flight = slow.in_flight
    assert r.stopped_by == "deadline" and 1 <= len(r.steps) < len(free.steps)
    assert r.chosen in r.steps[-1].survivors  # the best beam of the last step it finished
    for mine, theirs in zip(r.steps, free.steps):  # the steps it finished are the free search's (seeded)
        assert [c.text for c in mine.candidates] == [c.text for c in theirs.candidates]
    assert free.stopped_by is None and in_flight == 0
