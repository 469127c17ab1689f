"""The engine: readiness in every state, running usage across searches (failed ones included),
what it closes and what it leaves open, torch's thread pool set once by it, and the summary."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import openai
import pytest
from tiny_models import TinyModelDirs, cpu_scorer_config

from proxy.client import GuidedClient
from proxy.config import AppConfig, ConfigError, ScorerConfig, SearchConfig
from proxy.engine import Engine, Readiness, ScorerUnavailable
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.serving.app import GuidanceServer
from proxy.types import Continuation, Usage
from tests.conftest import on_any_port, upstream_config
from tests.doubles import Call, FnScorer, ScriptedUpstream, word_responder


@dataclass
class ClosingScorer(FnScorer):
    closes: int = 0

    async def aclose(self) -> None:
        self.closes += 1


def words(text: str, finished: bool) -> float:
    return float(len(set(text.split())))


def scorer_config() -> ScorerConfig:
    return ScorerConfig.model_validate({"tuned": {"path": "tuned"}, "untuned": {"path": "untuned"}})


def config(**kw: object) -> AppConfig:
    return AppConfig.model_validate({"upstream": {"model": "toy-instruct", "base_url": "http://127.0.0.1:9/v1"}, **kw})


async def test_probe_in_every_state(loopback: ToyCompletionsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow_load(cfg: ScorerConfig) -> FnScorer:
        release.wait(10)
        return FnScorer(words)

    monkeypatch.setattr("scorers.registry.load_scorer", slow_load)
    cfg = AppConfig(upstream=upstream_config(loopback), scorer=scorer_config())
    engine = Engine(cfg)
    assert await engine.probe() == Readiness(False, "not started", "not started")
    engine.open()
    engine.begin_loading()
    assert await engine.probe() == Readiness(False, "reachable", "loading")
    with pytest.raises(ScorerUnavailable, match="still loading") as e:
        await engine.search("Q:", SearchConfig(w=1, k=2))
    assert e.value.loading
    plain = await engine.search("Q:", SearchConfig(max_new_tokens=3, seed=0))  # plain sampling needs no scorer
    assert plain.score is None and plain.text
    release.set()
    await engine.wait_ready()
    assert await engine.probe() == Readiness(True, "reachable", "loaded")
    await engine.aclose()
    assert await engine.probe() == Readiness(False, "not started", "not started")
    await engine.start()  # opened again: a new upstream, the scorer loaded again
    assert await engine.probe() == Readiness(True, "reachable", "loaded") and engine.usage.calls == 0
    await engine.aclose()

    async with Engine(cfg.model_copy(update={"upstream": upstream_config(loopback, model="nope"), "scorer": None}),
                      ) as unknown:
        assert await unknown.probe() == Readiness(False, "model unknown: the upstream does not list 'nope'", "none")
    async with Engine(config(), upstream=ScriptedUpstream(word_responder())) as in_process:
        assert await in_process.probe() == Readiness(True, "in-process", "none")


async def test_a_failed_load_is_reported_and_start_closes_what_it_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cfg: ScorerConfig) -> None:
        raise OSError("tuned: no such model directory")

    monkeypatch.setattr("scorers.registry.load_scorer", broken)
    engine = Engine(config(scorer=scorer_config()))
    with pytest.raises(ScorerUnavailable, match=r"failed: OSError \(see the server log\)") as e:
        await engine.start()
    assert "no such model directory" in str(e.value.__cause__)  # the detail stays with the operator
    assert isinstance(e.value.__cause__, OSError) and not engine.started and engine.scorer_state == "not started"
    with pytest.raises(ConfigError, match="needs a scorer"):  # refused before anything is built
        await Engine(config(search={"w": 2, "k": 2})).start()


async def test_usage_runs_across_searches_and_counts_failed_ones() -> None:
    def respond(call: Call, i: int) -> Continuation:
        if call.prompt.startswith("BAD:") and call.prompt != "BAD:":  # its second step fails
            raise RuntimeError("the API went away")
        return word_responder()(call, i)

    up = ScriptedUpstream(respond)
    cfg = config(upstream={"model": "m", "base_url": "http://x/v1", "prices": {"prompt": 1.5, "completion": 2.0}})
    async with Engine(cfg, upstream=up, scorer=FnScorer(words)) as engine:
        a = await engine.search("A:", SearchConfig(w=2, k=2, l=2, max_new_tokens=4))
        b = await engine.search("B:", SearchConfig(w=1, k=3, max_new_tokens=5))
        assert engine.usage.usage == a.usage + b.usage and engine.usage.calls == a.calls + b.calls
        with pytest.raises(RuntimeError, match="went away"):
            await engine.search("BAD:", SearchConfig(w=1, k=1, l=2, max_new_tokens=4, seed=1))
        spent = engine.usage
    answered = up.calls[:-1]  # the last call failed: nothing billed
    billed = Usage(sum(len(c.prompt) for c in answered), sum(c.max_tokens * c.n for c in answered))
    assert spent.usage == billed and spent.calls == len(answered) == a.calls + b.calls + 1
    assert spent.cost_usd == pytest.approx((billed.prompt_tokens * 1.5 + billed.completion_tokens * 2.0) / 1e6)
    s = engine.summarize(a)
    assert (s.mode, s.steps, s.upstream_calls, s.tokens, s.prompt_tokens, s.score) == (
        "cbs-w2k2l2", len(a.steps), a.calls, a.tokens, a.usage.prompt_tokens, a.score)
    assert s.cost_usd == pytest.approx((a.usage.prompt_tokens * 1.5 + a.usage.completion_tokens * 2.0) / 1e6)
    assert engine.summarize(a, mode="fast").mode == "fast"


async def test_one_engine_shared_by_a_server_and_a_client_closes_its_scorer_once(
        loopback: ToyCompletionsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[ClosingScorer] = []

    def load(cfg: ScorerConfig) -> ClosingScorer:
        built.append(ClosingScorer(words))
        return built[-1]

    monkeypatch.setattr("scorers.registry.load_scorer", load)
    cfg = AppConfig(upstream=upstream_config(loopback), scorer=scorer_config())
    engine = Engine(cfg)
    await engine.start()
    async with GuidanceServer(on_any_port(cfg), engine=engine, shutdown_timeout_s=0.5) as server:
        api = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        r = await api.completions.create(model="toy-instruct+bon4", prompt="x", max_tokens=3, seed=1)
        await api.close()
        async with GuidedClient(cfg, engine=engine) as client:
            ref = await client.complete("x", w=1, k=4, max_new_tokens=3)
    assert r.model_extra["w2s"]["mode"] == "bon4" and ref.steps
    assert len(built) == 1 and built[0].closes == 0 and engine.started  # borrowers close nothing
    assert len(built[0].calls) == 2  # both searches used the one scorer
    await engine.aclose()
    await engine.aclose()
    assert built[0].closes == 1 and engine.scorer is None

    handed_in = ClosingScorer(words)
    async with GuidedClient(cfg, scorer=handed_in) as client:
        await client.complete("y", max_new_tokens=2)
    assert handed_in.closes == 0 and len(built) == 1  # what was handed in is neither loaded nor closed


def threads_in_a_new_thread() -> int:
    """What a thread started now (as a scorer's worker is) runs torch with."""
    import torch

    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


async def test_torch_threads_are_set_by_the_engine_not_the_factory(
        loopback: ToyCompletionsServer, tiny_model_dirs: TinyModelDirs) -> None:
    import torch

    from scorers.registry import load_scorer, set_torch_threads

    before = threads_in_a_new_thread()
    want = 1 if before != 1 else 2
    scorer_cfg = cpu_scorer_config(tiny_model_dirs.llama_tuned, tiny_model_dirs.llama_untuned, torch_threads=want)
    try:
        alone = await asyncio.to_thread(load_scorer, scorer_cfg)
        await alone.aclose()
        assert threads_in_a_new_thread() == before  # the factory changes nothing process-wide
        async with Engine(AppConfig(upstream=upstream_config(loopback), scorer=scorer_cfg)) as engine:
            assert threads_in_a_new_thread() == want and engine.scorer is not None
    finally:
        set_torch_threads(before)
        torch.set_num_threads(before)
