"""A search cut before its first step ended has no answer, and says so: a cap too small for the
first step is refused before anything is sent (400 naming the field), a deadline shorter than
one step is a 504 (in-band for a stream), never a 200 with an empty text."""
from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from proxy.client import GuidedClient
from proxy.config import AppConfig, ConfigError, SearchConfig
from proxy.search.plan import SettingTooSmall
from proxy.testing.toy_server import ToyCompletionsServer
from tests.conftest import upstream_config
from tests.test_server import MODEL, app_config, served


@pytest.mark.parametrize(("w2s", "param"), [({"max_upstream_tokens": 5}, "w2s.max_upstream_tokens"),
                                             ({"max_cost_usd": 1e-6}, "w2s.max_cost_usd")])
async def test_a_cap_too_small_for_the_first_step_is_refused_before_any_call(
        loopback: ToyCompletionsServer, w2s: dict[str, float], param: str) -> None:
    cfg = app_config(loopback, prices={"prompt": 1.0, "completion": 2.0})
    async with served(cfg) as (_, client):
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=20, extra_body={"w2s": w2s})
        enough = await client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                                 extra_body={"w2s": {"max_upstream_tokens": 60}})
    assert e.value.body["param"] == param and "cannot pay for the first step" in e.value.body["message"]
    assert len(loopback.requests) == 1 and enough.model_extra["w2s"]["steps"] == 1


async def test_a_deadline_shorter_than_one_step_is_a_504_whole_or_streamed() -> None:
    async with ToyCompletionsServer(latency_s=0.5) as slow:
        async with served(app_config(slow)) as (server, client):
            with pytest.raises(openai.APIStatusError) as whole:
                await client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                                extra_body={"w2s": {"deadline_s": 0.05}})
            body = {"model": MODEL, "prompt": "x", "max_tokens": 5, "stream": True, "w2s": {"deadline_s": 0.05}}
            async with aiohttp.ClientSession() as s, s.post(f"{server.base_url}/completions", json=body) as r:
                events = [line.removeprefix(b"data: ") async for line in r.content if line.startswith(b"data: ")]
    assert whole.value.status_code == 504 and whole.value.body["code"] == "deadline_exceeded"
    assert r.status == 200 and json.loads(events[-1])["error"]["code"] == "deadline_exceeded"
    assert not any(json.loads(e).get("choices", [{}])[0].get("text") for e in events[:-1])


async def test_the_client_refuses_the_same_cap_naming_the_setting(loopback: ToyCompletionsServer) -> None:
    cfg = AppConfig(upstream=upstream_config(loopback), search=SearchConfig(max_new_tokens=20))
    async with GuidedClient(cfg) as client:
        with pytest.raises(SettingTooSmall, match="search.max_upstream_tokens: 5 cannot pay") as e:
            await client.complete("x", max_upstream_tokens=5)
    assert isinstance(e.value, ConfigError) and loopback.requests == []


def test_an_alpaca_eval_item_cut_before_its_first_step_is_a_failure_to_retry() -> None:
    from proxy.alpaca_eval.dataset import Instruction
    from proxy.alpaca_eval.runner import item_record
    from proxy.client import Generated
    from proxy.search import SearchResult

    cut = SearchResult(text="", score=None, finished=False, tokens=0, config=SearchConfig(), stopped_by="deadline")
    record = item_record(3, Instruction(instruction="Say hi."), Generated(3, "Say hi.", result=cut),
                         client=None)  # type: ignore[arg-type]  # a failure needs no summary
    assert record.status == "failed" and record.output == "" and "before its first step" in (record.error or "")
