"""The remote scorer against engines on 127.0.0.1 that compute prompt log-probabilities the slow
way (tests/fake_logprob_engine.py, each sequence run alone through a tiny model): its scores
equal the local scorer's on the same weights, across chunk seams, with and without EOS, on
chat-templated prompts and across two vocabularies; its requests are what vLLM takes; replicas
share the load and a dead or broken one costs a retry, never a wrong number; a search through
the engine gives the local scorer's answer. The same checks against a real vLLM are in
tests/test_remote_scorer_vllm.py.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from fake_logprob_engine import FakeLogprobEngine
from pydantic import ValidationError
from tiny_models import TEXT_A, TinyModelDirs, load_eager

from proxy.config import AppConfig, ScorerConfig, SearchConfig
from proxy.engine import Engine
from proxy.serving.app import GuidanceServer
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.types import Conversation
from scorers.base import ScorerContextError, check_room
from scorers.implicit import ImplicitRewardScorer
from scorers.logprob_engine import EngineUnsuitable
from scorers.registry import load_scorer, open_scorer
from scorers.remote import RemoteScorer
from tests.conftest import on_any_port

PROMPT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there! How are you?"}]


def chunks_of(text: str, size: int) -> list[str]:
    """The growing prefixes a search scores: cut every `size` characters, mid-word included."""
    return [text[:i] for i in range(size, len(text) + size, size)]


@pytest.fixture(scope="module")
def pair(tiny_model_dirs: TinyModelDirs) -> tuple[Any, Any]:
    """Two vocabularies: mistral on tokenizer A (BOS from the tokenizer), gpt2 on tokenizer B
    (BOS from its template)."""
    return load_eager(tiny_model_dirs.mistral), load_eager(tiny_model_dirs.gpt2)


@pytest.fixture
async def engines(pair: tuple[Any, Any]) -> AsyncIterator[tuple[FakeLogprobEngine, FakeLogprobEngine]]:
    async with FakeLogprobEngine(pair[0][0], "tuned") as t, FakeLogprobEngine(pair[1][0], "untuned") as u:
        yield t, u


def remote_config(dirs: TinyModelDirs, tuned_urls: list[str] | str, untuned_urls: list[str] | str,
                  **fields: Any) -> ScorerConfig:
    return ScorerConfig.model_validate({
        "kind": "remote",
        "tuned": {"path": str(dirs.mistral), "engine": {"base_url": tuned_urls, "model": "tuned", "max_attempts": 3}},
        "untuned": {"path": str(dirs.gpt2), "engine": {"base_url": untuned_urls, "model": "untuned", "max_attempts": 3}},
        **fields})


async def started(cfg: ScorerConfig) -> RemoteScorer:
    scorer = await open_scorer(cfg)
    assert isinstance(scorer, RemoteScorer)
    return scorer


async def test_remote_equals_local_across_seams_eos_and_vocabularies(
        tiny_model_dirs: TinyModelDirs, pair: tuple[Any, Any], engines: tuple[FakeLogprobEngine, FakeLogprobEngine]) -> None:
    local = ImplicitRewardScorer.from_loaded(*pair)
    remote = await started(remote_config(tiny_model_dirs, engines[0].base_url, engines[1].base_url))
    try:
        texts = chunks_of(TEXT_A[2], 7)[:12]  # cuts inside words, after spaces, before punctuation
        with local.open(PROMPT) as a, remote.open(PROMPT) as b:
            for n in range(1, len(texts) + 1):  # a growing search: the local side reuses its caches
                grown = texts[:n] + [texts[n - 1]]
                flags = [False] * n + [True]  # the same text finished: the EOS term
                want, got = await a.score(grown, flags), await b.score(grown, flags)
                assert got == pytest.approx(want, abs=1e-4)
            assert await b.score([""], [False]) == [0.0]
            assert await b.score([""], [True]) == pytest.approx(await a.score([""], [True]), abs=1e-4)
    finally:
        await remote.aclose()
        await local.aclose()
    for engine in engines:  # what vLLM takes: token ids, one generated token, each token's own log-probability
        body = engine.bodies[-1]
        assert body["max_tokens"] == 1 and body["prompt_logprobs"] == 0 and body["temperature"] == 0
        assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in body["prompt"])


async def test_a_prompt_contrast_pair_on_one_engine(tiny_model_dirs: TinyModelDirs, pair: tuple[Any, Any],
                                                   engines: tuple[FakeLogprobEngine, FakeLogprobEngine]) -> None:
    """One model, two system prompts: both sides go to the same engine through one client."""
    side = {"path": str(tiny_model_dirs.mistral), "engine": {"base_url": engines[0].base_url, "model": "tuned"}}
    cfg = ScorerConfig.model_validate({"kind": "remote", "tuned": {**side, "system_prompt": "Be warm."},
                                       "untuned": {**side, "system_prompt": "Be cold."}})
    remote = await started(cfg)
    model, tokenizer, spec = pair[0]
    local = ImplicitRewardScorer.from_loaded((model, tokenizer, spec.model_copy(update={"system_prompt": "Be warm."})),
                                             (model, tokenizer, spec.model_copy(update={"system_prompt": "Be cold."})))
    try:
        assert remote.engines[0] is remote.engines[1]
        user = [PROMPT[1]]
        with local.open(user) as a, remote.open(user) as b:
            texts, flags = ["I am well", "I am well, thanks."], [False, True]
            got, want = await b.score(texts, flags), await a.score(texts, flags)
        assert got == pytest.approx(want, abs=1e-4) and got[0] != 0.0
    finally:
        await remote.aclose()
        await local.aclose()


async def test_replicas_share_the_load_and_a_dead_one_is_passed_over(
        tiny_model_dirs: TinyModelDirs, pair: tuple[Any, Any]) -> None:
    dead = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    async with FakeLogprobEngine(pair[0][0], "tuned") as t1, FakeLogprobEngine(pair[0][0], "tuned") as t2, \
            FakeLogprobEngine(pair[1][0], "untuned") as u:
        remote = await asyncio.to_thread(load_scorer, remote_config(
            tiny_model_dirs, [t1.base_url, t2.base_url], [dead, u.base_url], batch_size=1))
        assert isinstance(remote, RemoteScorer)
        local = ImplicitRewardScorer.from_loaded(*pair)
        try:
            texts = chunks_of(TEXT_A[0], 20)[:8]
            with local.open(PROMPT) as a, remote.open(PROMPT) as b:
                got = await b.score(texts, [False] * len(texts))  # 8 requests per side, at once
                want = await a.score(texts, [False] * len(texts))
            assert got == pytest.approx(want, abs=1e-4)
            assert t1.requests > 0 and t2.requests > 0 and t1.requests + t2.requests == len(texts)
            assert remote.engines[1].retries >= 1 and u.requests == len(texts)
        finally:
            await remote.aclose()
            await local.aclose()


@pytest.mark.parametrize("fault", [500, 429, "malformed"])
async def test_a_failed_or_malformed_answer_is_asked_again_never_summed(
        fault: int | str, tiny_model_dirs: TinyModelDirs, pair: tuple[Any, Any],
        engines: tuple[FakeLogprobEngine, FakeLogprobEngine]) -> None:
    remote = await started(remote_config(tiny_model_dirs, engines[0].base_url, engines[1].base_url))
    local = ImplicitRewardScorer.from_loaded(*pair)
    try:
        engines[0].fail_next = [fault]
        with local.open(PROMPT) as a, remote.open(PROMPT) as b:
            got, want = await b.score(["Fine, thanks."], [True]), await a.score(["Fine, thanks."], [True])
        assert got == pytest.approx(want, abs=1e-4)
        assert engines[0].requests == 2 and remote.engines[0].retries == 1
    finally:
        await remote.aclose()
        await local.aclose()


async def test_engines_that_cannot_serve_are_refused_at_start(
        tiny_model_dirs: TinyModelDirs, engines: tuple[FakeLogprobEngine, FakeLogprobEngine]) -> None:
    wrong = ScorerConfig.model_validate({
        "kind": "remote",
        "tuned": {"path": str(tiny_model_dirs.mistral), "engine": {"base_url": engines[0].base_url, "model": "zephyr"}},
        "untuned": {"path": str(tiny_model_dirs.gpt2), "engine": {"base_url": engines[1].base_url, "model": "untuned"}}})
    with pytest.raises(EngineUnsuitable, match=r"does not serve 'zephyr' \(it serves tuned\)"):
        await open_scorer(wrong)
    with pytest.raises(EngineUnsuitable, match=r"127.0.0.1:9/v1: APIConnectionError"):
        await open_scorer(remote_config(tiny_model_dirs, "http://127.0.0.1:9/v1", engines[1].base_url))


async def test_the_room_is_the_engines_context(tiny_model_dirs: TinyModelDirs, pair: tuple[Any, Any]) -> None:
    """An engine started with a short max_model_len bounds prompt + response, less the one token
    it must generate; a request that cannot fit is refused before any upstream call."""
    async with FakeLogprobEngine(pair[0][0], "tuned", max_model_len=200) as t, \
            FakeLogprobEngine(pair[1][0], "untuned") as u:
        remote = await started(remote_config(tiny_model_dirs, t.base_url, u.base_url))
        try:
            tuned = remote.sides[0]
            assert tuned.max_len == 199
            prompt_len = len(tuned.encode_prompt(tuned.render(PROMPT)).ids)
            assert remote.response_room(PROMPT) == 199 - prompt_len
            with pytest.raises(ScorerContextError) as e:
                check_room(remote, PROMPT, 199 - prompt_len)
            assert e.value.field == "max_tokens"
            assert t.requests == 0  # refused before the engine was asked
            # A response that re-tokenizes past the room (reached only inside a search) is scored
            # clipped to the room, as the local scorer does (scorers.room), not failed.
            with remote.open(PROMPT) as b:
                assert isinstance((await b.score([TEXT_A[1] * 3], [False]))[0], float)
        finally:
            await remote.aclose()


def test_config_says_what_is_wrong(tiny_model_dirs: TinyModelDirs) -> None:
    side = {"path": "m", "engine": {"base_url": "http://10.0.0.5:8001/v1"}}
    cfg = ScorerConfig.model_validate({"kind": "remote", "tuned": side, "untuned": side})
    assert cfg.tuned.engine is not None and cfg.tuned.engine.base_url == ["http://10.0.0.5:8001/v1"]
    cases = [
        ({"kind": "remote", "tuned": side, "untuned": {"path": "m"}}, "untuned.engine: scorer.kind remote needs"),
        ({"tuned": side, "untuned": {"path": "m"}}, "tuned.engine: only for scorer.kind remote"),
        ({"kind": "remote", "tuned": {**side, "adapter": "a"}, "untuned": side}, "tuned.adapter: a remote model's adapter"),
        ({"kind": "remote", "tuned": side, "untuned": side, "expo_alpha": 0.5}, "expo_alpha: ExPO edits weights"),
        ({"kind": "remote", "tuned": {"path": "m", "engine": {"base_url": "gpu1:8001"}}, "untuned": side},
         "is not an http"),
        ({"kind": "remote", "tuned": {"path": "m", "engine": {"base_url": []}}, "untuned": side}, "at least 1"),
    ]
    for data, message in cases:
        with pytest.raises(ValidationError, match=message):
            ScorerConfig.model_validate(data)


async def test_the_engine_key_comes_from_its_variable(tiny_model_dirs: TinyModelDirs, monkeypatch: pytest.MonkeyPatch,
                                                      engines: tuple[FakeLogprobEngine, FakeLogprobEngine]) -> None:
    from proxy.config import ConfigError

    data = remote_config(tiny_model_dirs, engines[0].base_url, engines[1].base_url).model_dump()
    data["tuned"]["engine"]["api_key_env"] = "W2S_TEST_ENGINE_KEY"
    monkeypatch.delenv("W2S_TEST_ENGINE_KEY", raising=False)
    with pytest.raises(ConfigError, match="set W2S_TEST_ENGINE_KEY"):
        await asyncio.to_thread(load_scorer, ScorerConfig.model_validate(data))


async def test_a_search_through_the_engines_gives_the_local_answer(
        tiny_model_dirs: TinyModelDirs, engines: tuple[FakeLogprobEngine, FakeLogprobEngine],
        loopback: ToyCompletionsServer, tmp_path: Path) -> None:
    """The engine (what `w2s serve`, the client and the runner share) loads a remote scorer,
    starts it, and a seeded CBS search picks exactly what the local scorer's search picks."""
    search = SearchConfig(w=2, k=2, l=4, max_new_tokens=16, temperature=1.0, seed=7)
    upstream = {"model": "toy", "base_url": loopback.base_url, "api_key_env": "W2S_TEST_NO_KEY"}
    remote_cfg = remote_config(tiny_model_dirs, engines[0].base_url, engines[1].base_url)
    local_cfg = ScorerConfig.model_validate({"tuned": {"path": str(tiny_model_dirs.mistral)},
                                             "untuned": {"path": str(tiny_model_dirs.gpt2)},
                                             "device": "cpu", "dtype": "float32", "attn_implementation": "eager"})
    results = []
    for scorer_cfg in (remote_cfg, local_cfg):
        async with Engine(AppConfig.model_validate({"upstream": upstream, "scorer": scorer_cfg.model_dump(),
                                                    "search": search.model_dump()})) as engine:
            results.append(await engine.search(Conversation.instruction("Tell me a story."), search))
    remote, local = results
    assert remote.text == local.text and remote.score == pytest.approx(local.score, abs=1e-4)
    assert [[c.text for c in s.candidates] for s in remote.steps] == [[c.text for c in s.candidates] for s in local.steps]
    assert [s.survivors for s in remote.steps] == [s.survivors for s in local.steps]
    assert engines[0].requests > 0 and engines[1].requests > 0


async def test_an_engine_that_keeps_failing_is_a_clear_502_not_an_upstream_failure(
        tiny_model_dirs: TinyModelDirs, engines: tuple[FakeLogprobEngine, FakeLogprobEngine],
        loopback: ToyCompletionsServer) -> None:
    """Through `w2s serve` with the real openai client: the scorer's engine failing every try is
    a 502 `scorer_error` naming the model and the kind of failure (never the engine's words),
    whole or streamed; its retries are not counted as the upstream's."""
    cfg = AppConfig.model_validate({
        "upstream": {"model": "toy", "base_url": loopback.base_url, "api_key_env": "W2S_TEST_NO_KEY"},
        "scorer": remote_config(tiny_model_dirs, engines[0].base_url, engines[1].base_url).model_dump(),
        "server": {"modes": {"cbs": {"w": 2, "k": 2, "l": 8}}}})
    async with GuidanceServer(on_any_port(cfg), shutdown_timeout_s=0.5) as server:
        await server.engine.wait_ready()
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
            engines[1].fail_next = [503] * 3
            with pytest.raises(openai.APIStatusError) as e:
                await client.completions.create(model="toy+cbs", prompt="Hi", max_tokens=16, seed=1)
            assert e.value.status_code == 502
            body = e.value.body if isinstance(e.value.body, dict) else {}
            assert body.get("code") == "scorer_error"
            assert "'untuned' failed after 3 tries (http_503)" in body.get("message", "")
            assert "injected" not in body.get("message", "")  # the engine's own words stay out
            engines[1].fail_next = [503] * 3
            stream = await client.completions.create(model="toy+cbs", prompt="Hi", max_tokens=16, seed=1, stream=True)
            with pytest.raises(openai.APIError, match="Guidance scoring failed"):
                async for _ in stream:
                    pass
            ok = await client.completions.create(model="toy+cbs", prompt="Hi", max_tokens=16, seed=1)
            assert ok.choices[0].text
        async with aiohttp.ClientSession() as http:
            async with http.get(server.base_url.removesuffix("/v1") + "/metrics") as r:
                metrics = await r.text()
    assert not [line for line in metrics.splitlines()
                if line.startswith("w2s_upstream_retries_total") and not line.rstrip().endswith(" 0.0")]
