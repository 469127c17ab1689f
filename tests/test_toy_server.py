"""The loopback server speaks OpenAI's completions protocol to the real `openai` client.

Everything here runs against 127.0.0.1 only; the whole file takes about a second.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from proxy.cost import get_encoding as load_encoding
from proxy.testing.toy_model import DEFAULT_VOCAB
from proxy.testing.toy_server import ToyCompletionsServer

ENC = load_encoding("cl100k_base")
PROMPT = "Once upon a time, in a quiet village,"


def ntok(text: str) -> int:
    return len(ENC.encode(text))


def client_for(server: ToyCompletionsServer, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, **kw)


@pytest.fixture
async def server() -> AsyncIterator[ToyCompletionsServer]:
    async with ToyCompletionsServer(eos_prob=0.0) as s:
        yield s


@pytest.fixture
async def client(server: ToyCompletionsServer) -> AsyncIterator[openai.AsyncOpenAI]:
    c = client_for(server)
    yield c
    await c.close()


async def post_raw(server: ToyCompletionsServer, data: bytes) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.base_url + "/completions", data=data,
                                headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json(), dict(resp.headers)


def test_default_vocab_words_are_single_tokens_and_concatenate_cleanly() -> None:
    assert len(DEFAULT_VOCAB) >= 40
    assert all(ntok(w) == 1 for w in DEFAULT_VOCAB)
    assert ntok("".join(DEFAULT_VOCAB) * 3) == 3 * len(DEFAULT_VOCAB)


def test_bad_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match="single"):
        ToyCompletionsServer(vocab=[" the", " antidisestablishmentarianism"])
    with pytest.raises(ValueError, match="space"):
        ToyCompletionsServer(vocab=["the", " cat"])


async def test_base_url_and_models(server: ToyCompletionsServer, client: openai.AsyncOpenAI) -> None:
    assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
    models = await client.models.list()
    assert [m.id for m in models.data] == ["toy-instruct"]


async def test_n_choices_are_distinct(client: openai.AsyncOpenAI) -> None:
    resp = await client.completions.create(model="toy-instruct", prompt=PROMPT, n=5, max_tokens=12)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert [c.index for c in resp.choices] == list(range(5))
    assert len({c.text for c in resp.choices}) == 5
    assert all(c.logprobs is None for c in resp.choices)


@pytest.mark.parametrize("max_tokens", [1, 7, 300])
async def test_max_tokens_gives_length_with_exact_token_count(client: openai.AsyncOpenAI, max_tokens: int) -> None:
    resp = await client.completions.create(model="toy-instruct", prompt=PROMPT, n=3, max_tokens=max_tokens)
    for c in resp.choices:
        assert c.finish_reason == "length"
        assert ntok(c.text) == max_tokens
        assert c.text.startswith(" ")
    assert resp.usage is not None and resp.usage.completion_tokens == 3 * max_tokens


async def test_eos_finishes_with_stop_before_max_tokens() -> None:
    async with ToyCompletionsServer(eos_prob=0.5) as server, client_for(server) as client:
        resp = await client.completions.create(model="m", prompt=PROMPT, n=16, max_tokens=50, seed=0)
    stopped = [c for c in resp.choices if c.finish_reason == "stop"]
    assert stopped and all(ntok(c.text) < 50 for c in stopped)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == sum(ntok(c.text) for c in resp.choices)


async def test_stop_sequences_truncate(client: openai.AsyncOpenAI) -> None:
    kw: dict[str, Any] = dict(model="toy-instruct", prompt=PROMPT, max_tokens=40, seed=11)
    full = (await client.completions.create(**kw)).choices[0]
    assert full.finish_reason == "length"
    words = full.text.split(" ")[1:]
    target = " " + words[5]
    first = full.text.find(target)

    one = (await client.completions.create(stop=target, **kw)).choices[0]
    assert (one.text, one.finish_reason) == (full.text[:first], "stop")

    # Several stops: cut at the earliest occurrence; a stop may end mid-word.
    partial = words[3][:2]
    many = (await client.completions.create(stop=["zzz", target, partial], **kw)).choices[0]
    cut = min(i for i in (full.text.find(target), full.text.find(partial)) if i >= 0)
    assert (many.text, many.finish_reason) == (full.text[:cut], "stop")

    never = (await client.completions.create(stop=["<never>"], **kw)).choices[0]
    assert (never.text, never.finish_reason) == (full.text, "length")


async def test_seed_reproducible_across_servers_and_differs_between_seeds() -> None:
    kw: dict[str, Any] = dict(model="toy-instruct", prompt=PROMPT, n=3, max_tokens=30, temperature=0.9, top_p=0.95)
    texts = []
    for _ in range(2):
        async with ToyCompletionsServer() as server, client_for(server) as client:
            a = await client.completions.create(seed=123, **kw)
            b = await client.completions.create(seed=124, **kw)
            texts.append(([c.text for c in a.choices], [c.text for c in b.choices]))
    assert texts[0] == texts[1]
    seed_123, seed_124 = texts[0]
    assert seed_123 != seed_124


async def test_same_seed_longer_max_tokens_extends_the_same_text(client: openai.AsyncOpenAI) -> None:
    kw: dict[str, Any] = dict(model="toy-instruct", prompt=PROMPT, n=2, seed=5)
    short = await client.completions.create(max_tokens=8, **kw)
    long = await client.completions.create(max_tokens=30, **kw)
    for s, l in zip(short.choices, long.choices):
        assert l.text.startswith(s.text) and len(l.text) > len(s.text)


async def test_unseeded_samples_vary(client: openai.AsyncOpenAI) -> None:
    kw: dict[str, Any] = dict(model="toy-instruct", prompt=PROMPT, max_tokens=25)
    a = await client.completions.create(**kw)
    b = await client.completions.create(**kw)
    assert a.choices[0].text != b.choices[0].text


async def test_temperature_zero_is_deterministic_without_seed() -> None:
    async with ToyCompletionsServer() as server, client_for(server) as client:  # default eos_prob
        kw: dict[str, Any] = dict(model="toy-instruct", prompt=PROMPT, n=3, max_tokens=60, temperature=0)
        a = await client.completions.create(**kw)
        b = await client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({(c.text, c.finish_reason) for c in a.choices}) == 1


async def test_usage_matches_tiktoken(client: openai.AsyncOpenAI) -> None:
    prompt = "Tokens: naïve café — 12345 <|endoftext|> done."
    resp = await client.completions.create(model="toy-instruct", prompt=prompt, n=4, max_tokens=20,
                                           stop=[" the"], seed=3)
    u = resp.usage
    assert u is not None
    assert u.prompt_tokens == len(ENC.encode_ordinary(prompt))  # once per request, not per choice
    assert u.completion_tokens == sum(ntok(c.text) for c in resp.choices)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


async def test_prompt_as_list_of_one_string(client: openai.AsyncOpenAI) -> None:
    resp = await client.completions.create(model="toy-instruct", prompt=[PROMPT], max_tokens=4, seed=1)
    same = await client.completions.create(model="toy-instruct", prompt=PROMPT, max_tokens=4, seed=1)
    assert resp.choices[0].text == same.choices[0].text


async def test_support_n_false_refuses_n_above_one() -> None:
    async with ToyCompletionsServer(support_n=False) as server, client_for(server) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="toy-instruct", prompt=PROMPT, n=2, max_tokens=4)
        assert info.value.status_code == 400
        assert info.value.param == "n"
        assert "n > 1" in info.value.message
        ok = await client.completions.create(model="toy-instruct", prompt=PROMPT, n=1, max_tokens=4)
        assert len(ok.choices) == 1
    assert [r["n"] for r in server.requests] == [2, 1]
    assert server.completed == 1


async def test_failures_queue_then_success() -> None:
    async with ToyCompletionsServer(failures=[429, 500, 503], retry_after_s=0.25) as server, \
            client_for(server) as client:
        kw: dict[str, Any] = dict(model="toy-instruct", prompt=PROMPT, max_tokens=3)
        with pytest.raises(openai.RateLimitError) as rate:
            await client.completions.create(**kw)
        assert rate.value.type == "rate_limit_error"
        assert rate.value.response.headers["retry-after-ms"] == "250"
        for status in (500, 503):
            with pytest.raises(openai.InternalServerError) as err:
                await client.completions.create(**kw)
            assert err.value.status_code == status and err.value.type == "server_error"
        resp = await client.completions.create(**kw)
        assert len(resp.choices) == 1
    assert len(server.requests) == 4 and server.completed == 1 and not server.failures


async def test_failure_carries_retry_after_header() -> None:
    async with ToyCompletionsServer(failures=[429], retry_after_s=2) as server:
        status, body, headers = await post_raw(server, json.dumps({"model": "m", "prompt": "x"}).encode())
        assert status == 429
        assert headers["Retry-After"] == "2"
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] is None
        status, body, headers = await post_raw(server, json.dumps({"model": "m", "prompt": "x"}).encode())
        assert status == 200 and "Retry-After" not in headers


async def test_malformed_json_is_an_openai_shaped_400(server: ToyCompletionsServer) -> None:
    status, body, _ = await post_raw(server, b'{"model": "m", "prompt": ')
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert server.requests == [] and server.completed == 0


@pytest.mark.parametrize(("field", "value"), [
    ("n", 0), ("max_tokens", 0), ("max_tokens", "many"), ("temperature", 2.5), ("temperature", -0.1),
    ("top_p", 0), ("top_p", 1.5), ("stop", ["a", "b", "c", "d", "e"]), ("seed", "abc"),
    ("stream", True), ("prompt", [1, 2, 3]), ("model", None),
])
async def test_invalid_fields_name_their_param(server: ToyCompletionsServer, field: str, value: Any) -> None:
    request = {"model": "toy-instruct", "prompt": "hi", field: value}
    status, body, _ = await post_raw(server, json.dumps(request).encode())
    assert status == 400
    assert body["error"]["param"] == field and body["error"]["type"] == "invalid_request_error"


async def test_unknown_and_null_fields_are_tolerated(server: ToyCompletionsServer) -> None:
    request = {"model": "toy-instruct", "prompt": "hi", "logprobs": None, "echo": False, "user": "u",
               "stream": False, "n": None, "max_tokens": None, "stop": None, "seed": None, "whatever": 1}
    status, body, _ = await post_raw(server, json.dumps(request).encode())
    assert status == 200
    assert len(body["choices"]) == 1 and body["model"] == "toy-instruct"


async def test_requests_log_records_bodies_in_order(server: ToyCompletionsServer,
                                                   client: openai.AsyncOpenAI) -> None:
    await client.completions.create(model="toy-instruct", prompt="first", max_tokens=2, seed=1, stop=["x"])
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="toy-instruct", prompt="second", max_tokens=2, temperature=3)
    await asyncio.gather(*(client.completions.create(model="toy-instruct", prompt=f"p{i}", max_tokens=2)
                           for i in range(3)))
    assert [r["prompt"] for r in server.requests[:2]] == ["first", "second"]
    assert sorted(r["prompt"] for r in server.requests[2:]) == ["p0", "p1", "p2"]
    assert server.requests[0]["seed"] == 1 and server.requests[0]["stop"] == ["x"]
    assert server.completed == 4 and server.in_flight == 0


async def test_client_timeout_cancels_the_handler() -> None:
    async with ToyCompletionsServer(latency_s=5.0) as server, client_for(server, timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.completions.create(model="toy-instruct", prompt=PROMPT, max_tokens=3)
        for _ in range(100):
            if server.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert server.in_flight == 0 and server.completed == 0
        assert len(server.requests) == 1


async def test_concurrent_requests_overlap_under_latency() -> None:
    async with ToyCompletionsServer(latency_s=0.2) as server, client_for(server) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        task = asyncio.gather(*(client.completions.create(model="m", prompt=str(i), max_tokens=2)
                                for i in range(8)))
        await asyncio.sleep(0.1)
        assert server.in_flight == 8
        await task
        assert loop.time() - t0 < 1.0  # concurrent, not 8 x 0.2 s
        assert server.completed == 8 and server.in_flight == 0


async def test_unknown_routes_and_methods_are_openai_shaped_404s() -> None:
    async with ToyCompletionsServer() as server, aiohttp.ClientSession() as http:
        root = server.base_url.removesuffix("/v1")
        for method, path in [("GET", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("GET", "/")]:
            async with http.request(method, root + path) as resp:
                body = await resp.json()
            assert resp.status == 404, (method, path)
            assert body["error"]["type"] == "invalid_request_error" and path in body["error"]["message"]
