"""The guidance server end to end: real aiohttp server on 127.0.0.1, the loopback upstream, and
the real `openai.AsyncOpenAI` client (raw aiohttp only where a client would never send it).

Every answer is checked against an independent computation: the same search run in-process
on the same seeded loopback upstream gives the same text, score, steps and billed tokens.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.client import GuidedClient
from proxy.config import AppConfig, ConfigError, SearchConfig, ServerConfig
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.presets import resolve_server
from proxy.search import search
from proxy.serving.app import GuidanceServer
from proxy.types import Conversation, SampleResult, SamplingParams, derive_seed
from proxy.upstreams.base import Upstream
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import on_any_port, upstream_config
from tests.doubles import FnScorer

MODEL = "toy-instruct"


def distinct_words(text: str, finished: bool) -> float:
    return float(len(set(text.split()))) + (1.0 if finished else 0.0)


def app_config(loopback: ToyCompletionsServer, *, search: dict[str, Any] | None = None,
               server: dict[str, Any] | None = None, **upstream: Any) -> AppConfig:
    return AppConfig(upstream=upstream_config(loopback, **upstream), search=SearchConfig(**(search or {})),
                     server=ServerConfig.model_validate(resolve_server(server or {})))


@asynccontextmanager
async def served(cfg: AppConfig, *, scorer: Any = None, upstream: Upstream | None = None,
                 api_key: str = "unused") -> AsyncIterator[tuple[GuidanceServer, openai.AsyncOpenAI]]:
    async with GuidanceServer(on_any_port(cfg), scorer=scorer, upstream=upstream,
                              shutdown_timeout_s=0.5) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=api_key, max_retries=0)
        try:
            yield server, client
        finally:
            await client.close()


def root(server: GuidanceServer) -> str:
    return server.base_url.removesuffix("/v1")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels` (so leaving out `mode` sums over
    the modes), read with prometheus_client's own parser; the sample must be exported."""
    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.name == name and labels.items() <= s.labels.items()]
    assert values, f"{name}{labels} not exported"
    return sum(values)


async def wait_for(predicate: Any, what: str, limit_s: float = 5.0) -> None:
    for _ in range(int(limit_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------ answers


async def test_plain_completion_passes_the_openai_fields_through(loopback: ToyCompletionsServer) -> None:
    async with served(app_config(loopback)) as (_, client):
        r = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, seed=5,
                                            temperature=0.9, top_p=0.5, stop=["."])
    assert len(loopback.requests) == 1
    sent = loopback.requests[0]
    assert {k: sent[k] for k in ("prompt", "n", "max_tokens", "temperature", "top_p", "stop", "seed")} == {
        "prompt": "Once upon a time", "n": 1, "max_tokens": 12, "temperature": 0.9, "top_p": 0.5, "stop": ["."],
        "seed": derive_seed(5, 1, 0)}
    # independently: the same request straight to the upstream
    direct = openai.AsyncOpenAI(base_url=loopback.base_url, api_key="x", max_retries=0)
    d = await direct.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                        top_p=0.5, stop=["."], seed=derive_seed(5, 1, 0))
    await direct.close()
    assert r.choices[0].text == d.choices[0].text and r.choices[0].finish_reason == d.choices[0].finish_reason
    assert r.usage is not None and d.usage is not None and r.model == MODEL and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.total_tokens)
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.model_extra["w2s"] == {"mode": "base", "steps": 1, "upstream_calls": 1, "score": None,
                                    "finished": d.choices[0].finish_reason == "stop",
                                    "tokens": d.usage.completion_tokens, "cost_usd": 0.0,
                                    "wall_s": r.model_extra["w2s"]["wall_s"], "stopped_by": None,
                                    "cached_tokens": 0, "cache_write_tokens": 0}


async def test_guided_completion_equals_the_in_process_search(loopback: ToyCompletionsServer) -> None:
    prices = {"prompt": 1.5, "completion": 2.0}
    cfg = app_config(loopback, prices=prices)
    async with served(cfg, scorer=FnScorer(distinct_words)) as (_, client):
        r = await client.completions.create(model=f"{MODEL}+cbs-w2k2l30", prompt="The cat", max_tokens=14,
                                            seed=3, extra_body={"w2s": {"l": 8}})
    served_requests = list(loopback.requests)
    # the mode's own settings (temperature 0.7 from configs/search/cbs-w2k2l30.yaml) with l and budget overridden
    expected_cfg = SearchConfig(w=2, k=2, l=8, max_new_tokens=14, temperature=0.7, top_p=1.0, seed=3)
    async with OpenAICompletionsUpstream(cfg.upstream) as up:
        ref = await search("The cat", up, FnScorer(distinct_words), expected_cfg)
    # the first step draws W*K = 4 of the prompt, every later request K = 2 per beam
    assert [(q["n"], q["temperature"]) for q in served_requests] == [(4, 0.7)] + [(2, 0.7)] * (ref.calls - 1)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ("stop" if ref.finished else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    w2s = r.model_extra["w2s"]
    assert (w2s["mode"], w2s["steps"], w2s["upstream_calls"], w2s["score"], w2s["tokens"]) == (
        "cbs-w2k2l8", len(ref.steps), ref.calls, ref.score, ref.tokens)
    assert w2s["cost_usd"] == pytest.approx((ref.usage.prompt_tokens * 1.5 + ref.usage.completion_tokens * 2.0) / 1e6)
    assert len(ref.steps) >= 2  # a real multi-step search, not a single chunk


async def test_chat_is_rendered_for_the_completions_upstream(loopback: ToyCompletionsServer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a pet."}]
    scorer = FnScorer(distinct_words)
    cfg = app_config(loopback)
    async with served(cfg, scorer=scorer) as (_, client):
        r = await client.chat.completions.create(model=f"{MODEL}+bon4", messages=messages,  # type: ignore[arg-type]
                                                 max_completion_tokens=10, seed=7)
    assert loopback.requests[0]["prompt"] == "Be brief.\n\nInstruction: Name a pet.\nOutput:"
    assert [q["n"] for q in loopback.requests] == [4]
    assert scorer.prompts == [messages]
    async with GuidedClient(cfg, scorer=FnScorer(distinct_words)) as guided:
        ref = await guided.chat(messages, w=1, k=4, max_new_tokens=10, seed=7)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text.lstrip() and ref.text.startswith(" ")
    assert r.model_extra["w2s"]["score"] == ref.score and r.model_extra["w2s"]["mode"] == "bon4"


async def test_model_list_and_aliases_from_config(loopback: ToyCompletionsServer) -> None:
    modes = {"fast": {"w": 2, "k": 2, "l": 8, "max_new_tokens": 9}, "bon3": {"preset": "bon4", "k": 3}}
    async with served(app_config(loopback, server={"modes": modes}), scorer=FnScorer(distinct_words)) as (_, client):
        ids = [m.id async for m in client.models.list()]
        await client.completions.create(model=f"{MODEL}+bon3", prompt="A", max_tokens=5, seed=1)
        await client.completions.create(model=f"{MODEL}+fast", prompt="B", seed=1)
        await client.completions.create(model=MODEL, prompt="C", seed=1, extra_body={"w2s": {"mode": "bon3"}})
        with pytest.raises(openai.NotFoundError) as e:
            await client.completions.create(model=f"{MODEL}+bon4", prompt="D")
    assert ids == [MODEL, f"{MODEL}+fast", f"{MODEL}+bon3"]
    first_request: dict[str, tuple[int, int]] = {}
    for q in loopback.requests:
        if isinstance(q["prompt"], str):  # later steps of "fast" send its two beams as a prompt list
            first_request.setdefault(q["prompt"], (q["n"], q["max_tokens"]))
    assert [first_request[p] for p in "ABC"] == [(3, 5), (4, 8), (3, 2048)]  # fast's first step: W*K = 4
    assert e.value.body == {"message": f"The model `{MODEL}+bon4` does not exist; GET /v1/models lists the served ones",
                            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


async def test_without_a_scorer_only_plain_sampling_is_served(loopback: ToyCompletionsServer) -> None:
    """Only the modes that need no scorer: plain sampling, by the model's name or the `base` preset."""
    async with served(app_config(loopback)) as (_, client):
        assert [m.id async for m in client.models.list()] == [MODEL, f"{MODEL}+base"]
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model=f"{MODEL}+bon4", prompt="x")
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model=MODEL, prompt="x", extra_body={"w2s": {"k": 2}})
        r = await client.completions.create(model=MODEL, prompt="x", max_tokens=3,
                                            extra_body={"w2s": {"l": 8, "prefer_finished": True}})
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt="x", extra_body={"w2s": {"prefer_finished": "maybe"}})
        with pytest.raises(openai.BadRequestError) as bad_start:
            await client.completions.create(model=MODEL, prompt="x", extra_body={"w2s": {"narrow_start": "maybe"}})
    assert bad.value.body["param"] == "w2s.prefer_finished"
    assert bad_start.value.body["param"] == "w2s.narrow_start"
    assert e.value.body["param"] == "w2s" and "needs a scorer" in e.value.body["message"]
    assert r.model_extra["w2s"]["mode"] == "cbs-w1k1l8"


async def test_caps_bound_every_request(loopback: ToyCompletionsServer) -> None:
    caps = {"max_w_times_k": 8, "min_l": 4, "max_tokens": 20}
    async with served(app_config(loopback, server={"caps": caps}), scorer=FnScorer(distinct_words)) as (srv, client):
        refused = []
        for model, extra, max_tokens in [(f"{MODEL}+bon8", {"w": 3}, None), (MODEL, {"w": 4, "k": 4}, None),
                                         (MODEL, {"w": 2, "k": 2, "l": 3}, None), (MODEL, {}, 21)]:
            with pytest.raises(openai.BadRequestError) as e:
                await client.completions.create(model=model, prompt="x", max_tokens=max_tokens,
                                                extra_body={"w2s": extra})
            refused.append((e.value.body["param"], e.value.body["message"]))
        ids = [m.id async for m in client.models.list()]
        ok = await client.completions.create(model=f"{MODEL}+bon8", prompt="x", seed=2)
    assert refused == [("w2s", "w*k = 24 exceeds this server's cap of 8"),
                       ("w2s", "w*k = 16 exceeds this server's cap of 8"),
                       ("w2s.l", "l = 3 is below this server's minimum chunk length of 4"),
                       ("max_tokens", "max_tokens = 21 exceeds this server's cap of 20")]
    assert loopback.requests[0]["n"] == 8 and loopback.requests[0]["max_tokens"] == 20  # the preset's 2048, capped
    assert ok.model_extra["w2s"]["tokens"] <= 20
    # presets over the cap are left out of the default modes
    assert ids == [MODEL, f"{MODEL}+base", f"{MODEL}+bon4", f"{MODEL}+bon8", f"{MODEL}+cbs-w2k2l30"]


# ------------------------------------------------------------------------------ streaming


async def collect(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


async def test_streamed_completion_concatenates_to_the_whole_answer(loopback: ToyCompletionsServer) -> None:
    body = dict(model=f"{MODEL}+cbs-w2k2l30", prompt="The dog", max_tokens=24, seed=11,
                extra_body={"w2s": {"l": 8}})
    async with served(app_config(loopback), scorer=FnScorer(distinct_words)) as (_, client):
        whole = await client.completions.create(**body)  # type: ignore[call-overload]
        chunks = await collect(await client.completions.create(stream=True, stream_options={"include_usage": True},
                                                               **body))  # type: ignore[call-overload]
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert text_chunks[-1].model_extra["w2s"] == {**whole.model_extra["w2s"],
                                                  "wall_s": text_chunks[-1].model_extra["w2s"]["wall_s"]}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1
    assert sum(1 for c in text_chunks if c.choices[0].text) >= 2  # text arrived before the end


class GatedUpstream(Upstream):
    """Holds every call after the first until `gate` is set: proves text is sent mid-search."""

    def __init__(self, inner: Upstream) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.asked = 0

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        self.asked += 1
        if self.asked > 1:
            await self.gate.wait()
        return await self.inner.sample(conversation, partial, params)


async def test_settled_prefix_is_sent_while_the_search_runs(loopback: ToyCompletionsServer) -> None:
    cfg = app_config(loopback)
    async with OpenAICompletionsUpstream(cfg.upstream) as inner:
        gated = GatedUpstream(inner)
        async with served(cfg, scorer=FnScorer(distinct_words), upstream=gated) as (_, client):
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell a story."}], max_tokens=30, seed=4,
                stream=True, extra_body={"w2s": {"w": 1, "k": 3, "l": 8}})
            it = stream.__aiter__()
            first = await asyncio.wait_for(it.__anext__(), 10)
            second = await asyncio.wait_for(it.__anext__(), 10)  # step 1's survivor, while step 2 is held
            await wait_for(lambda: gated.asked == 2, "step 2 to ask the upstream")
            assert not gated.gate.is_set()
            gated.gate.set()
            rest = [c async for c in it]
        async with GuidedClient(cfg, scorer=FnScorer(distinct_words), upstream=inner) as guided:
            ref = await guided.chat([{"role": "user", "content": "Tell a story."}], w=1, k=3, l=8,
                                    max_new_tokens=30, seed=4)
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    chunks = [ref.nodes[i].chunk for i in ref.path]
    assert len(chunks) >= 2 and second.choices[0].delta.content == chunks[0].lstrip()
    content = [c.choices[0].delta.content or "" for c in [second, *rest]]
    assert "".join(content) == ref.text.lstrip()
    # with one beam every step's chunk settles at once: one delta per step
    assert [x for x in content if x] == [x for x in [chunks[0].lstrip(), *chunks[1:]] if x]
    assert rest[-1].choices[0].finish_reason == ("stop" if ref.finished else "length")


async def test_upstream_failure_mid_stream_is_reported_in_band(loopback: ToyCompletionsServer) -> None:
    async with served(app_config(loopback, max_attempts=2), scorer=FnScorer(distinct_words)) as (srv, client):
        loopback.failures.extend([500, 500])
        stream = await client.completions.create(model=MODEL, prompt="x", stream=True, max_tokens=5)
        with pytest.raises(openai.APIError) as e:
            await collect(stream)
        text = srv.metrics.render()[0].decode()
    assert e.value.body == {"message": "The upstream failed with HTTP 500 (after retries).", "type": "upstream_error",
                            "param": None, "code": "upstream_error"}
    assert metric(text, "w2s_requests_total", endpoint="/v1/completions", status="502") == 1


# ------------------------------------------------------------------------------ errors


async def raw_post(server: GuidanceServer, path: str, data: bytes, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(server.base_url + path, data=data,
                          headers={"Content-Type": "application/json", **(headers or {})}) as r:
            return r.status, await r.json()


@pytest.mark.parametrize(("body", "param", "message"), [
    (b"{not json", None, "We could not parse the JSON body of your request."),
    (b"[1, 2]", None, "The request body must be a JSON object (Input should be an object)."),
    (b'{"prompt": "x"}', "model", "model: Field required"),
    (b'{"model": "toy-instruct", "prompt": "x", "max_tokens": "5"}', "max_tokens",
     "max_tokens: Input should be a valid integer"),
    (b'{"model": "toy-instruct", "prompt": "x", "temperature": 3}', "temperature",
     "temperature: Input should be less than or equal to 2"),
    (b'{"model": "toy-instruct", "prompt": "x", "tools": []}', "tools", "tools: unknown field"),
    (b'{"model": "toy-instruct", "prompt": ["a", "b"]}', "prompt",
     "prompt: Input should be a valid string or List should have at most 1 item after validation, not 2"),
    (b'{"model": "toy-instruct", "prompt": "x", "logprobs": 2}', "logprobs",
     "logprobs: logprobs are not available: the upstream's tokens are resampled by the search"),
    (b'{"model": "toy-instruct", "prompt": "x", "w2s": {"w": 0}}', "w2s.w",
     "w2s.w: Input should be greater than or equal to 1"),
    (b'{"model": "toy-instruct", "prompt": "x", "w2s": {"beams": 2}}', "w2s.beams", "w2s.beams: unknown field"),
    (b'{"model": "toy-instruct", "prompt": "x", "w2s": {"mode": "nope"}}', "w2s.mode",
     "unknown mode 'nope' (known: base, bon16, bon4, bon8, cbs-w2k2l30, cbs-w4k4l30)"),
])
async def test_malformed_bodies_are_400_naming_the_field(loopback: ToyCompletionsServer, body: bytes,
                                                         param: str | None, message: str) -> None:
    async with served(app_config(loopback), scorer=FnScorer(distinct_words)) as (srv, _):
        status, answer = await raw_post(srv, "/completions", body)
    assert status == 400 and answer["error"]["param"] == param and answer["error"]["message"] == message
    assert answer["error"]["type"] == "invalid_request_error" and loopback.requests == []


async def test_chat_validation_names_the_field(loopback: ToyCompletionsServer) -> None:
    async with served(app_config(loopback)) as (_, client):
        errors = []
        for kw in [dict(messages=[]), dict(messages=[{"role": "tool", "content": "x"}]),
                   dict(messages=[{"role": "assistant", "content": "x"}]),
                   dict(messages=[{"role": "user", "content": "x"}], n=2)]:
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(model=MODEL, **kw)  # type: ignore[call-overload]
            errors.append(e.value.body["param"])
    assert errors == ["messages", "messages.0.role", "messages", "n"]
    assert loopback.requests == []


async def test_body_too_large_is_413(loopback: ToyCompletionsServer) -> None:
    async with served(app_config(loopback, server={"max_body_bytes": 2048})) as (srv, client):
        big = json.dumps({"model": MODEL, "prompt": "x" * 4096}).encode()
        status, answer = await raw_post(srv, "/completions", big)
        with pytest.raises(openai.APIStatusError) as e:
            await client.completions.create(model=MODEL, prompt="y" * 4096)
        ok = await client.completions.create(model=MODEL, prompt="y" * 1024, max_tokens=2)

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
            yield b'{"model": "toy-instruct", "prompt": "'
            for _ in range(8):
                yield b"z" * 512
            yield b'"}'

        async with aiohttp.ClientSession() as s:
            async with s.post(srv.base_url + "/completions", data=chunked()) as r:
                chunked_status, chunked_answer = r.status, await r.json()
    assert status == 413 == e.value.status_code == chunked_status and answer["error"]["code"] == "request_too_large"
    assert chunked_answer == answer
    assert answer["error"]["message"] == "The request body exceeds 2048 bytes."
    assert ok.choices and len(loopback.requests) == 1


async def test_proxy_keys_are_required_when_configured(loopback: ToyCompletionsServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W2S_TEST_PROXY_KEYS", "key-one, key-two")
    cfg = app_config(loopback, server={"api_keys_env": "W2S_TEST_PROXY_KEYS"})
    async with served(cfg, api_key="key-two") as (srv, client):
        r = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        for wrong in ("key-three", "key-one,key-two", "key-"):
            with pytest.raises(openai.AuthenticationError) as e:
                await client.with_options(api_key=wrong).completions.create(model=MODEL, prompt="x")
            assert e.value.body["code"] == "invalid_api_key" and e.value.body["type"] == "authentication_error"
        async with aiohttp.ClientSession() as s:
            async with s.get(srv.base_url + "/models") as no_key:
                assert no_key.status == 401
            async with s.get(srv.base_url + "/models", headers={"Authorization": "Basic key-one"}) as basic:
                assert basic.status == 401
            async with s.get(root(srv) + "/health") as health:
                assert health.status == 200
    assert r.choices and len(loopback.requests) == 1
    monkeypatch.delenv("W2S_TEST_PROXY_KEYS")
    with pytest.raises(ConfigError, match="server.api_keys_env: set W2S_TEST_PROXY_KEYS"):
        GuidanceServer(cfg)


async def test_models_retrieve_and_a_body_that_does_not_decode(loopback: ToyCompletionsServer) -> None:
    async with served(app_config(loopback)) as (srv, client):
        card = await client.models.retrieve(MODEL)
        listed = [m.id for m in (await client.models.list()).data]
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no-such-model")
        async with aiohttp.ClientSession() as s:
            async with s.post(srv.base_url + "/completions", data=b"\x1f\x8b not gzip at all",
                              headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}) as r:
                bad_gzip = (r.status, await r.json())
    assert card.id == MODEL and MODEL in listed
    assert missing.value.body["code"] == "model_not_found"
    assert bad_gzip[0] == 400 and bad_gzip[1]["error"]["code"] == "invalid_encoding"
    assert loopback.requests == []


async def test_concurrency_limit_is_429() -> None:
    async with ToyCompletionsServer(latency_s=0.3) as slow:
        async with served(app_config(slow, server={"max_concurrent_requests": 1})) as (srv, client):
            first = asyncio.create_task(client.completions.create(model=MODEL, prompt="a", max_tokens=2))
            await wait_for(lambda: slow.in_flight == 1, "the first request to reach the upstream")
            with pytest.raises(openai.RateLimitError) as e:
                await client.completions.create(model=MODEL, prompt="b", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            await first
            after = await client.completions.create(model=MODEL, prompt="c", max_tokens=2)
    assert e.value.body["code"] == "concurrency_limit" and e.value.body["type"] == "rate_limit_error"
    assert [q["prompt"] for q in slow.requests] == ["a", "c"] and after.choices


async def test_upstream_errors_are_502_and_504_and_never_show_the_upstream_key(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-upstream-SECRET-0123456789"
    monkeypatch.setenv("W2S_TEST_UPSTREAM_KEY", secret)
    caplog.set_level("DEBUG")
    seen: list[str] = []
    async with ToyCompletionsServer(latency_s=0.5) as slow, ToyCompletionsServer() as failing:
        failing.failures.extend([500, 503])
        cfg = app_config(failing, api_key_env="W2S_TEST_UPSTREAM_KEY", max_attempts=2)
        async with served(cfg) as (srv, client):
            with pytest.raises(openai.APIStatusError) as bad_gateway:
                await client.completions.create(model=MODEL, prompt="x")
            seen.append(json.dumps(bad_gateway.value.body))
            async with aiohttp.ClientSession() as s:
                for path in ("/metrics", "/health/ready", "/v1/models"):
                    async with s.get(root(srv) + path) as r:
                        seen.append(await r.text())
        assert len(failing.requests) == 2  # the retry policy ran before giving up
        cfg = app_config(slow, api_key_env="W2S_TEST_UPSTREAM_KEY", max_attempts=1, timeout_s=0.1)
        async with served(cfg) as (srv, client):
            with pytest.raises(openai.APIStatusError) as timeout:
                await client.completions.create(model=MODEL, prompt="x")
            seen.append(json.dumps(timeout.value.body))
    assert bad_gateway.value.status_code == 502 and timeout.value.status_code == 504
    assert bad_gateway.value.body == {"message": "The upstream failed with HTTP 503 (after retries).",
                                      "type": "upstream_error", "param": None, "code": "upstream_error"}
    assert timeout.value.body["code"] == "upstream_timeout"
    seen.append(caplog.text)
    assert caplog.text and not any(secret in s or secret[-10:] in s for s in seen)


async def test_a_scorer_failure_is_a_500_whole_or_streamed(loopback: ToyCompletionsServer) -> None:
    def broken(text: str, finished: bool) -> float:
        raise ValueError("sequence exceeds the model's positions")

    async with served(app_config(loopback), scorer=FnScorer(broken)) as (srv, client):
        with pytest.raises(openai.InternalServerError) as whole:
            await client.completions.create(model=f"{MODEL}+bon4", prompt="x", max_tokens=3)
        stream = await client.completions.create(model=f"{MODEL}+bon4", prompt="x", max_tokens=3, stream=True)
        with pytest.raises(openai.APIError) as streamed:
            await collect(stream)
        text = srv.metrics.render()[0].decode()
    expected = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    assert whole.value.body == streamed.value.body == expected
    assert metric(text, "w2s_requests_total", endpoint="/v1/completions", status="500") == 2
    assert metric(text, "w2s_searches_total", outcome="error") == 2


# ------------------------------------------------------------------------------ disconnects


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_the_search_and_its_upstream_calls(stream: bool) -> None:
    scorer = FnScorer(distinct_words)
    async with ToyCompletionsServer(latency_s=0.6) as slow:
        async with served(app_config(slow), scorer=scorer) as (srv, client):
            async def ask() -> Any:
                r = await client.completions.create(model=f"{MODEL}+cbs-w2k2l30", prompt="x", max_tokens=40,
                                                    stream=stream)
                return await collect(r) if stream else r

            task = asyncio.create_task(ask())
            await wait_for(lambda: slow.in_flight == 1, "the search's first upstream call")
            task.cancel()  # the client gives up: its connection closes
            await wait_for(lambda: slow.in_flight == 0, "the upstream call to be cancelled")
            await wait_for(lambda: srv.metrics.total("w2s_searches_total", outcome="cancelled") == 1, "the search to end")
            await asyncio.sleep(0.8)  # past the upstream's latency: a live search would have asked again
            assert len(slow.requests) == 1 and slow.completed == 0
            assert srv.metrics.total("w2s_generations_in_flight") == 0 and scorer.open_sessions == 0
            assert scorer.calls == []


async def test_slow_clients_are_timed_out(loopback: ToyCompletionsServer) -> None:
    """Clients that trickle their request head are closed after idle_timeout_s; one that trickles
    its body gets a 408 after body_timeout_s. Bounded: 20 sockets, a few seconds."""
    cfg = app_config(loopback, server={"idle_timeout_s": 1.0, "body_timeout_s": 1.0})
    async with served(cfg) as (srv, _):
        host, port = "127.0.0.1", int(srv.base_url.split(":")[2].split("/")[0])

        async def trickle_head() -> float:
            reader, writer = await asyncio.open_connection(host, port)
            t0 = asyncio.get_running_loop().time()
            try:
                for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n":
                    writer.write(bytes([byte]))
                    await writer.drain()
                    if await _closed_within(reader, 0.3):
                        return asyncio.get_running_loop().time() - t0
                return -1.0  # still open after the whole head: never timed out
            finally:
                writer.close()

        lifetimes = await asyncio.wait_for(asyncio.gather(*(trickle_head() for _ in range(20))), 20)

        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
    assert all(0 < t < 5 for t in lifetimes), lifetimes
    assert status_line.startswith(b"HTTP/1.1 408")
    assert loopback.requests == []


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closed the connection (EOF) within `seconds`."""
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except TimeoutError:
        return False


async def test_a_quiet_stream_gets_keepalive_comments_the_client_skips() -> None:
    async with ToyCompletionsServer(latency_s=0.4) as slow:
        cfg = app_config(slow, server={"stream_keepalive_s": 0.1})
        async with served(cfg) as (srv, client):
            async with aiohttp.ClientSession() as s:
                async with s.post(srv.base_url + "/completions", json={
                        "model": MODEL, "prompt": "a", "max_tokens": 3, "stream": True, "seed": 1}) as r:
                    raw = (await r.read()).decode()
            chunks = [c async for c in await client.completions.create(
                model=MODEL, prompt="a", max_tokens=3, stream=True, seed=1)]
    events = [e for e in raw.split("\n\n") if e]
    assert events.count(": keepalive") >= 2  # one upstream call of 0.4 s, nothing to say meanwhile
    assert events[-1] == "data: [DONE]"
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events
                       if e.startswith("data: {") and json.loads(e[6:])["choices"])
    assert streamed == "".join(c.choices[0].text for c in chunks if c.choices) != ""
