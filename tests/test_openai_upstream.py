"""The completions upstream against a real HTTP server through the real openai SDK."""
from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from proxy.config import SearchConfig
from proxy.cost import count_tokens
from proxy.local.backend import Choice, CompletionParams
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.search import search
from proxy.serving.errors import ApiError
from proxy.types import Conversation, Probe, SampleResult, SamplingParams, Usage, request_seed, sample_seed
from proxy.upstreams.errors import UpstreamError, retry_after_from
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import upstream_config
from tests.doubles import FnScorer


async def test_one_request_with_n_and_exact_token_counts(loopback: ToyCompletionsServer) -> None:
    async with OpenAICompletionsUpstream(upstream_config(loopback)) as up:
        res = await up.sample_prompt("Once upon a time",
                              SamplingParams(n=6, max_tokens=12, stop=["."], temperature=0.9, seed=5))
    assert len(loopback.requests) == 1
    body = loopback.requests[0]
    assert (body["n"], body["max_tokens"], body["seed"], body["stop"], body["temperature"]) == (6, 12, 5, ["."], 0.9)
    assert len(res.continuations) == 6 and res.calls == 1
    for c in res.continuations:
        if c.finish_reason == "length":
            assert not c.finished and c.num_tokens == 12 == count_tokens(c.text)
        else:
            assert c.finished and c.num_tokens == count_tokens(c.text)
    assert res.usage.prompt_tokens == count_tokens("Once upon a time")
    assert res.usage.completion_tokens == sum(c.num_tokens for c in res.continuations)


PROMPTS = ["Once upon a time", "The rain fell on", "A small dog and"]


async def alone(server: ToyCompletionsServer, prompt: str, seed: int) -> list[tuple[str, str | None, int]]:
    """What `prompt` gets in a request of its own, from a fresh server with the same sampler."""
    async with ToyCompletionsServer(eos_prob=server.lm.eos_prob) as fresh:
        async with OpenAICompletionsUpstream(upstream_config(fresh)) as up:
            return triples(await up.sample_prompt(prompt, SamplingParams(n=3, max_tokens=6, stop=["."], seed=seed)))


def triples(res: SampleResult) -> list[tuple[str, str | None, int]]:
    return [(c.text, c.finish_reason, c.num_tokens) for c in res.continuations]


async def test_a_list_of_prompts_is_one_request_answered_prompt_major(loopback: ToyCompletionsServer) -> None:
    async with OpenAICompletionsUpstream(upstream_config(loopback)) as up:
        assert up.max_prompts_per_call == 16
        res = await up.sample_prompts(PROMPTS, SamplingParams(n=3, max_tokens=6, stop=["."]), seeds=[7, 8, 9])
    assert len(loopback.requests) == 1 and res.calls == 1
    body = loopback.requests[0]
    seed = request_seed([7, 8, 9])  # one seed per request, from all three
    assert (body["prompt"], body["n"], body["seed"]) == (PROMPTS, 3, seed) and seed not in (7, 8, 9)
    # Each prompt's three continuations are exactly what it gets alone with that seed.
    assert triples(res) == [t for p in PROMPTS for t in await alone(loopback, p, seed)]
    assert res.usage.prompt_tokens == sum(count_tokens(p) for p in PROMPTS)
    assert res.usage.completion_tokens == sum(c.num_tokens for c in res.continuations)


async def test_a_server_refusing_prompt_lists_gets_one_prompt_per_request() -> None:
    async with ToyCompletionsServer(support_prompt_lists=False) as server:
        async with OpenAICompletionsUpstream(upstream_config(server)) as up:
            res = await up.sample_prompts(PROMPTS, SamplingParams(n=3, max_tokens=6, stop=["."]), seeds=[7, 8, 9])
            assert up.max_prompts_per_call == 1  # remembered
            assert len(server.requests) == 4 and server.completed == 3 and res.calls == 3
            again = await up.sample_prompts(PROMPTS[:2], SamplingParams(n=3, max_tokens=6, stop=["."]), seeds=[7, 8])
            assert len(server.requests) == 6  # no list tried again
    assert triples(res) == [t for p, seed in zip(PROMPTS, [7, 8, 9]) for t in await alone(server, p, seed)]
    assert triples(again) == triples(res)[:6]


async def test_a_list_over_the_servers_limit_falls_back_to_one_prompt_per_request() -> None:
    async with ToyCompletionsServer() as server:
        async with OpenAICompletionsUpstream(upstream_config(server, max_prompts_per_call=100)) as up:
            res = await up.sample_prompts([f"P{i}" for i in range(65)], SamplingParams(n=1, max_tokens=2))  # the server takes 64
            assert up.max_prompts_per_call == 1
    assert len(server.requests) == 66 and server.completed == 65 and res.calls == 65
    assert len(res.continuations) == 65


class RefusesBad(ToyCompletionsServer):
    """Refuses the prompt "BAD" wherever it is, as an API refuses a prompt over its context window."""

    def __init__(self) -> None:
        super().__init__()
        toy = self.backend

        class Refusing:
            async def complete(self, params: CompletionParams) -> tuple[list[Choice], int]:
                if params.prompt == "BAD":
                    raise ApiError(400, "this prompt is too long", param="prompt")
                return await toy.complete(params)

        self.backend = Refusing()


async def test_a_bad_prompt_in_a_list_raises_and_lists_stay_on() -> None:
    async with RefusesBad() as server:
        async with OpenAICompletionsUpstream(upstream_config(server)) as up:
            with pytest.raises(UpstreamError) as bad:
                await up.sample_prompts(["fine", "BAD"], SamplingParams(n=2, max_tokens=3))
            assert bad.value.status == 400 and bad.value.refused == {"prompt"}
            assert up.max_prompts_per_call == 16  # alone it failed too: the prompt was bad, not the list
            await up.sample_prompts(["fine", "also fine"], SamplingParams(n=2, max_tokens=3))
    assert isinstance(server.requests[-1]["prompt"], list)


class FirstPromptOnly(ToyCompletionsServer):
    """Answers a list of prompts as if it held only its first one (a server that mishandles lists)."""

    def __init__(self) -> None:
        super().__init__()
        toy, server = self.backend, self

        class FirstOnly:
            async def complete(self, params: CompletionParams) -> tuple[list[Choice], int]:
                sent = server.requests[-1]["prompt"]
                if isinstance(sent, list) and params.prompt != sent[0]:
                    return [], 0
                return await toy.complete(params)

        self.backend = FirstOnly()


async def test_a_list_answered_with_missing_choices_is_redone_one_by_one_and_billed() -> None:
    async with FirstPromptOnly() as server:
        async with OpenAICompletionsUpstream(upstream_config(server)) as up:
            res = await up.sample_prompts(PROMPTS, SamplingParams(n=3, max_tokens=6, stop=["."]), seeds=[7, 8, 9])
            assert up.max_prompts_per_call == 16  # one odd answer is not proof
            assert res.usage == up.usage
            await up.sample_prompts(PROMPTS, SamplingParams(n=3, max_tokens=6))
            assert up.max_prompts_per_call == 1  # two in a row are
    assert len(server.requests) == 8 and res.calls == 4
    # each prompt redone alone under the list's one seed: what the whole list would have given
    assert triples(res) == [t for p in PROMPTS for t in await alone(server, p, request_seed([7, 8, 9]))]
    wasted = count_tokens(PROMPTS[0])  # the list request billed its first prompt and its choices
    assert res.usage.prompt_tokens == wasted + sum(count_tokens(p) for p in PROMPTS)


async def test_a_server_ignoring_n_is_detected_after_two_short_answers_and_asked_again_later() -> None:
    async with ToyCompletionsServer(ignore_n=True) as server:
        cfg = upstream_config(server)
        async with OpenAICompletionsUpstream(cfg) as up:
            up.n_choices.recheck_after = 3
            first = await up.sample_prompt("P", SamplingParams(n=4, max_tokens=5, seed=10))
            assert [r["n"] for r in server.requests] == [4, 1, 1, 1]  # the 3 missing, in parallel
            assert up.n_choices.on  # one short answer does not turn n off
            await up.sample_prompt("P", SamplingParams(n=2, max_tokens=5))
            assert not up.n_choices.on
            for _ in range(3):  # off: n=1 requests only
                await up.sample_prompt("P", SamplingParams(n=2, max_tokens=5))
            assert [r["n"] for r in server.requests[6:]] == [1] * 6
            await up.sample_prompt("P", SamplingParams(n=2, max_tokens=5))
            assert server.requests[12]["n"] == 2  # asked again after recheck_after requests without it
        async with OpenAICompletionsUpstream(cfg.model_copy(update={"supports_n": False})) as told:
            await told.sample_prompt("P", SamplingParams(n=3, max_tokens=5))
            assert [r["n"] for r in server.requests[-3:]] == [1, 1, 1]  # configured: never asked
    assert len(first.continuations) == 4 and first.calls == 4 and len({c.text for c in first.continuations}) > 1


async def test_server_refusing_n_gets_parallel_single_requests() -> None:
    async with ToyCompletionsServer(support_n=False) as server:
        async with OpenAICompletionsUpstream(upstream_config(server)) as up:
            first = await up.sample_prompt("P", SamplingParams(n=4, max_tokens=5, seed=10))
            assert [r["n"] for r in server.requests] == [4, 1, 1, 1, 1]
            assert sorted(r.get("seed") for r in server.requests[1:]) == sorted(sample_seed(10, i) for i in range(4))
            assert server.requests[1]["seed"] == 10  # sample 0 keeps the request's seed
            second = await up.sample_prompt("P", SamplingParams(n=3, max_tokens=5))
            assert [r["n"] for r in server.requests[5:]] == [1, 1, 1]  # remembered: no second refusal
    assert len(first.continuations) == 4 and first.calls == 4
    assert len({c.text for c in first.continuations}) > 1
    assert len(second.continuations) == 3


@pytest.mark.parametrize("n", [1, 3])
async def test_a_200_that_is_not_an_answer_is_retried_and_only_answers_are_billed(n: int) -> None:
    faults = ["truncated", "no-choices", "empty-length"]
    async with ToyCompletionsServer(failures=faults) as server:
        async with OpenAICompletionsUpstream(upstream_config(server)) as up:
            res = await up.sample_prompt("P", SamplingParams(n=n, max_tokens=4, seed=5))
            with pytest.raises(UpstreamError, match="no choices"):
                server.failures.extend(["no-choices"] * 6)  # every attempt: it gives up with why
                await up.sample_prompt("P", SamplingParams(n=1, max_tokens=4))
    assert len(server.requests) == 4 + 6 and res.calls == 1 and len(res.continuations) == n
    assert all(c.text and c.num_tokens == 4 for c in res.continuations if not c.finished)
    assert res.usage == up.usage and res.usage.prompt_tokens == count_tokens("P")  # the bad 200s billed nothing


async def test_transient_failures_are_retried_honouring_retry_after() -> None:
    async with ToyCompletionsServer(failures=[429, 500, 503, 408], retry_after_s=0.05) as server:
        async with OpenAICompletionsUpstream(upstream_config(server)) as up:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            res = await up.sample_prompt("P", SamplingParams(n=2, max_tokens=3))
            waited = loop.time() - t0
    assert len(server.requests) == 5 and len(res.continuations) == 2
    assert waited >= 4 * 0.05  # four server-requested waits, not the 10 ms backoff


async def test_retries_give_up_with_the_upstream_error() -> None:
    async with ToyCompletionsServer(failures=[502] * 10) as server:
        async with OpenAICompletionsUpstream(upstream_config(server, max_attempts=3)) as up:
            with pytest.raises(UpstreamError) as failed:
                await up.sample_prompt("P", SamplingParams(n=1, max_tokens=3))
    assert len(server.requests) == 3 and failed.value.status == 502 and failed.value.retryable


async def test_client_errors_are_not_retried(loopback: ToyCompletionsServer) -> None:
    async with OpenAICompletionsUpstream(upstream_config(loopback)) as up:
        with pytest.raises(UpstreamError) as refused:
            await up.sample_prompt("P", SamplingParams(n=1, max_tokens=3, temperature=5.0))
    assert len(loopback.requests) == 1 and (refused.value.status, refused.value.retryable) == (400, False)


async def test_concurrency_limit_bounds_requests_in_flight() -> None:
    async with ToyCompletionsServer(latency_s=0.05) as server:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, server.in_flight)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        async with OpenAICompletionsUpstream(upstream_config(server, max_concurrency=2)) as up:
            await asyncio.gather(*(up.sample_prompt("P", SamplingParams(n=1, max_tokens=2)) for _ in range(6)))
        watcher.cancel()
    assert peak == 2 and server.completed == 6


async def test_context_window_caps_max_tokens(loopback: ToyCompletionsServer) -> None:
    prompt = " the cat sat on the mat"  # 6 tokens
    async with OpenAICompletionsUpstream(upstream_config(loopback, context_window=10)) as up:
        await up.sample_prompt(prompt, SamplingParams(n=1, max_tokens=50))
        full = await up.sample_prompt(prompt * 2, SamplingParams(n=2, max_tokens=50))
    assert loopback.requests[0]["max_tokens"] == 4
    assert len(loopback.requests) == 1 and full.calls == 0 and all(c.num_tokens == 0 for c in full.continuations)


async def test_api_key_never_reaches_logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-SECRET-123456"
    monkeypatch.setenv("W2S_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    async with ToyCompletionsServer(failures=[500, 500]) as server:
        async with OpenAICompletionsUpstream(upstream_config(server, api_key_env="W2S_TEST_KEY")) as up:
            await up.sample_prompt("P", SamplingParams(n=1, max_tokens=2))
    assert "retrying" in caplog.text and secret not in caplog.text
    assert secret not in repr(upstream_config(server, api_key_env="W2S_TEST_KEY"))


def test_retry_after_parsing() -> None:
    assert retry_after_from({"retry-after": "2"}) == 2.0
    assert retry_after_from({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_from({}) is None
    past = retry_after_from({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert past is not None and 0 <= past < 1  # a date in the past: no wait
    assert retry_after_from({"retry-after": "soon"}) is None


@pytest.mark.parametrize("per_call", [1, 16])
async def test_cbs_over_http_sends_the_exact_requests(loopback: ToyCompletionsServer, per_call: int) -> None:
    scorer = FnScorer(lambda text, finished: float(len(set(text.split()))))
    cfg = SearchConfig(w=2, k=3, l=4, max_new_tokens=10, seed=7)
    async with OpenAICompletionsUpstream(upstream_config(loopback, max_prompts_per_call=per_call)) as up:
        r = await search("Instruction: tell a story\nOutput:", up, scorer, cfg)
    per_step = [len(s.expanded) for s in r.steps]
    assert len(loopback.requests) == r.calls == (sum(per_step) if per_call == 1 else len(r.steps))
    it = iter(loopback.requests)
    for s in r.steps:
        bodies = [next(it) for _ in range(s.calls)]
        sent = sorted(p for b in bodies for p in (b["prompt"] if isinstance(b["prompt"], list) else [b["prompt"]]))
        assert sent == sorted("Instruction: tell a story\nOutput:" + r.nodes[b].text for b in s.expanded)
        assert {b["max_tokens"] for b in bodies} == {min(4, 10 - r.nodes[b].tokens) for b in s.expanded}
        assert all(b["n"] == (6 if s.step == 1 else 3) for b in bodies)  # W*K of the prompt, then K per beam
    assert r.usage.completion_tokens == sum(len(c.chunk.split()) for s in r.steps for c in s.candidates)
    assert r.tokens == count_tokens(r.text)


async def test_connection_errors_and_timeouts_are_retried_then_raised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="w2s.upstream")
    async with ToyCompletionsServer() as closed:
        dead_url = closed.base_url  # the port is free again once the server stops
    cfg = upstream_config(closed, base_url=dead_url, max_attempts=3)
    async with OpenAICompletionsUpstream(cfg) as up:
        with pytest.raises(UpstreamError) as refused:
            await up.sample_prompt("P", SamplingParams(n=1, max_tokens=2))
    assert refused.value.kind == "connection"
    assert caplog.text.count("(connection)") == 2  # attempts 1 and 2 retried, the 3rd raised
    async with ToyCompletionsServer(latency_s=1.0) as slow:
        async with OpenAICompletionsUpstream(upstream_config(slow, timeout_s=0.1, max_attempts=3)) as up:
            with pytest.raises(UpstreamError) as timeout:
                await up.sample_prompt("P", SamplingParams(n=1, max_tokens=2))
    assert timeout.value.kind == "timeout"
    assert caplog.text.count("(timeout)") == 2 and slow.completed == 0


class KeyRefused(ToyCompletionsServer):
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "bad key", "type": "auth"}}, status=401)


async def test_running_usage_counts_every_billed_call_and_probe_says_why_not(
        loopback: ToyCompletionsServer) -> None:
    async with OpenAICompletionsUpstream(upstream_config(loopback)) as up:
        assert (up.usage, up.api_calls) == (Usage(), 0)
        a = await up.sample_prompt("P", SamplingParams(n=2, max_tokens=3))
        b = await up.sample_prompts(PROMPTS, SamplingParams(n=2, max_tokens=3))
        assert up.usage == a.usage + b.usage and up.api_calls == a.calls + b.calls == 2
        assert await up.probe() == Probe("reachable")
    async with OpenAICompletionsUpstream(upstream_config(loopback, model="other-model")) as up:
        assert await up.probe() == Probe("model unknown", "the upstream does not list 'other-model'")
    async with KeyRefused() as server:
        async with OpenAICompletionsUpstream(upstream_config(server)) as up:
            assert await up.probe() == Probe("refused", "HTTP 401")
        dead = server.base_url
    async with OpenAICompletionsUpstream(upstream_config(loopback, base_url=dead)) as up:
        assert await up.probe() == Probe("unreachable", "APIConnectionError")


async def test_trailing_whitespace_held_back_is_joined_on_exactly(loopback: ToyCompletionsServer) -> None:
    """The toy's words carry their leading space: a partial ending in a space, sent as is, would
    double it; held back (hold_trailing_whitespace), the continuation's own space takes its place."""
    conv = Conversation.completion("the cat sat on")
    params = SamplingParams(n=3, max_tokens=4, seed=9)
    async with OpenAICompletionsUpstream(upstream_config(loopback)) as plain:
        unheld = await plain.sample_batch(conv, [" the mat ", " a"], params, seeds=[9, 10])
    async with OpenAICompletionsUpstream(upstream_config(loopback, hold_trailing_whitespace=True)) as up:
        held = await up.sample_batch(conv, [" the mat ", " a"], params, seeds=[9, 10])
        stripped = await up.sample_batch(conv, [" the mat", " a"], params, seeds=[9, 10])
    assert [r["prompt"] for r in loopback.requests[-2:]] == [["the cat sat on the mat", "the cat sat on a"]] * 2
    assert [c.text for c in held.continuations[:3]] == [c.text[1:] for c in stripped.continuations[:3]]
    assert held.continuations[3:] == stripped.continuations[3:]  # nothing held: as sent
    assert all(c.text.startswith(" ") for c in unheld.continuations[:3])  # the doubled space it avoids


async def test_extra_body_adds_fields_but_never_overrides_the_searchs(loopback: ToyCompletionsServer) -> None:
    extra = {"repetition_penalty": 1.1, "max_tokens": 999, "prompt": "not this"}
    async with OpenAICompletionsUpstream(upstream_config(loopback, extra_body=extra)) as up:
        await up.sample_prompt("P", SamplingParams(n=2, max_tokens=3, seed=4))
    [body] = loopback.requests
    assert (body["repetition_penalty"], body["max_tokens"], body["prompt"]) == (1.1, 3, "P")
    assert (body["n"], body["seed"]) == (2, 4)
