"""A key's budget under concurrency: a step holds its bound on the budget while in flight, so 100
concurrent requests on one key cannot all get in on its last few tokens (docs/budgets.md)."""
from __future__ import annotations

import asyncio
import math

import openai
import pytest

from proxy.budget import Budget, Reservation, admit, release_admission
from proxy.config import Prices, SearchConfig
from proxy.cost import cost_usd
from proxy.search import search
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.types import Usage
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import upstream_config
from tests.doubles import FnScorer
from tests.test_server import MODEL, app_config, served

PRICES = Prices(prompt=1000.0, completion=2000.0)  # dollars per million tokens
MAX_TOKENS = 16
CBS = SearchConfig(w=2, k=2, l=4, max_new_tokens=40, temperature=1.0, seed=5)


def words(text: str, finished: bool) -> float:
    return float(len(set(text.split())))


def test_a_reservation_counts_as_spent_here_and_in_every_parent_until_released() -> None:
    key = Budget(max_tokens=100)
    mine = Budget(max_tokens=1000, parent=key)
    held = mine.reserve(Usage(0, 60))
    assert isinstance(held, Reservation) and key.reserved == mine.reserved == Usage(0, 60)
    assert mine.reserve(Usage(0, 50)) is key  # the key's cap, counting what is held, says no
    assert key.blocker(Usage(0, 40)) is None and key.blocker(Usage(0, 41)) is key
    mine.charge(Usage(5, 30))  # billed less than held, then released
    held.release()
    held.release()  # twice is once
    assert key.reserved == mine.reserved == Usage() and key.spent == Usage(5, 30)
    assert isinstance(mine.reserve(Usage(0, 65)), Reservation)
    dollars = Budget(max_usd=0.1, prices=PRICES)
    assert isinstance(dollars.reserve(Usage(0, 40)), Reservation)  # $0.08 held
    assert dollars.reserve(Usage(0, 11)) is dollars  # $0.022 more would pass $0.10


async def test_admission_holds_the_first_step_and_hands_it_to_the_step() -> None:
    key = Budget(max_tokens=20)

    async def request() -> Reservation | None:
        held = admit(key, Usage(0, 12))
        await asyncio.sleep(0)
        return held

    first, second = await asyncio.gather(request(), request())  # one admission leaves no room for another
    assert isinstance(first, Reservation) and second is None and key.reserved == Usage(0, 12)
    release_admission()  # another task's hold is not this one's
    assert key.reserved == Usage(0, 12)
    first.release()
    assert key.reserved == Usage()


async def test_a_failed_or_cancelled_step_releases_its_hold() -> None:
    budget = Budget(max_tokens=10_000)
    async with ToyCompletionsServer(latency_s=5.0) as slow:
        async with OpenAICompletionsUpstream(upstream_config(slow)) as up:
            task = asyncio.create_task(search("the cat sat", up, FnScorer(words), CBS, budget=budget))
            await asyncio.sleep(0.2)
            assert budget.reserved.completion_tokens > 0  # the first step's bound, held while it runs
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert budget.reserved == Usage()
    async with ToyCompletionsServer(fault_rate=1.0) as broken:
        async with OpenAICompletionsUpstream(upstream_config(broken, max_attempts=1)) as up:
            with pytest.raises(Exception):
                await search("the cat sat", up, FnScorer(words), CBS, budget=budget)
    assert budget.reserved == Usage() and budget.spent == Usage()


@pytest.mark.parametrize("cap", [{"key_budget_tokens": 300}, {"key_budget_usd": 0.4}])
async def test_100_concurrent_requests_on_one_key_pass_its_budget_by_at_most_the_stated_bound(
        cap: dict[str, float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W2S_TEST_KEYS", "key-a")
    async with ToyCompletionsServer(latency_s=0.05) as upstream:
        cfg = app_config(upstream, prices=PRICES.model_dump(),
                         server={"api_keys_env": "W2S_TEST_KEYS", "max_concurrent_requests": 200, **cap})
        async with served(cfg, api_key="key-a") as (srv, client):
            async def one(i: int) -> openai.types.Completion | openai.RateLimitError:
                try:
                    return await client.completions.create(model=MODEL, prompt="the cat sat on the mat",
                                                           max_tokens=MAX_TOKENS, seed=i)
                except openai.RateLimitError as e:
                    return e

            outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100))), 30)
    answers = [o for o in outcomes if not isinstance(o, openai.RateLimitError)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert answers and refused and len(answers) + len(refused) == 100
    assert all(e.body["code"] == "insufficient_quota" for e in refused)
    assert all(a.choices[0].text and a.model_extra["w2s"]["steps"] >= 1 for a in answers)  # admitted: answered
    billed = sum((Usage(a.usage.prompt_tokens, a.usage.completion_tokens) for a in answers), Usage())
    prompt = max(a.usage.prompt_tokens for a in answers)
    # The bound (docs/budgets.md): each step in flight holds at least its bound (MAX_TOKENS completion
    # tokens here), so at most cap // bound are in flight at once; each can be billed beyond its bound
    # only the prompt it is sent (a first step's bound cannot know it).
    bound = Usage(0, MAX_TOKENS)
    if "key_budget_tokens" in cap:
        in_flight = cap["key_budget_tokens"] // bound.total_tokens
        assert billed.total_tokens <= cap["key_budget_tokens"] + in_flight * prompt
    else:
        in_flight = math.floor(cap["key_budget_usd"] / cost_usd(bound, PRICES) + 1e-9)
        assert cost_usd(billed, PRICES) <= cap["key_budget_usd"] + in_flight * cost_usd(Usage(prompt, 0), PRICES) + 1e-12
    assert len(answers) < 100  # without holds every one of them got in
