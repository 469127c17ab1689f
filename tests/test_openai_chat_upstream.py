"""The chat completions upstream against the fake chat API (proxy.testing.fake_openai_chat)
through the real openai SDK, in each provider dialect."""
from __future__ import annotations

from typing import Any

import openai
import pytest

from proxy.config import OpenAIChatConfig, SearchConfig
from proxy.cost import count_tokens
from proxy.protocol.model_requests import CompletionParams
from proxy.search import search
from proxy.testing.fake_openai_chat import REASONING, FakeChatServer, render
from proxy.types import Continuation, Conversation, Probe, SampleResult, SamplingParams, sample_seed
from proxy.upstreams.errors import UpstreamError
from proxy.upstreams.openai_chat import OpenAIChatUpstream
from proxy.upstreams.registry import make_upstream
from tests.doubles import FnScorer

CONV = Conversation.chat([{"role": "system", "content": "You tell short stories."},
                          {"role": "user", "content": "Tell me about a cat"}])
PARTIAL = " Once upon a time the cat"
DIALECT_CONFIG: dict[str, dict[str, Any]] = {
    "vllm": {"continuation": "continue_final_message"},
    "deepseek": {"continuation": "prefix"},
    "mistral": {"continuation": "prefix", "seed_param": "random_seed"},
    "ignores-n": {"continuation": "continue_final_message"},
}


def chat_config(server: FakeChatServer, **kw: Any) -> OpenAIChatConfig:
    """An openai-chat upstream on the fake, in its dialect, with fast retries."""
    base: dict[str, Any] = dict(kind="openai-chat", model="toy-chat", base_url=server.base_url,
                                backoff_initial_s=0.01, backoff_max_s=0.05, timeout_s=10.0,
                                **DIALECT_CONFIG[server.dialect])
    base.update(kw)
    return OpenAIChatConfig.model_validate(base)


def toy(server: FakeChatServer, conv: Conversation, partial: str, params: SamplingParams,
        seed: int | None, index: int) -> tuple[str, str, int]:
    """(text, finish reason, tokens) of choice `index` of a request seeded `seed`, as the fake's
    model continues `partial` after `conv` (recomputed here, not read from the server)."""
    messages = [*conv.messages, {"role": "assistant", "content": partial}] if partial else list(conv.messages)
    p = CompletionParams(model="toy-chat", prompt=render(messages, bool(partial)), n=params.n,
                         max_tokens=params.max_tokens, stop=params.stop, temperature=params.temperature,
                         top_p=params.top_p, seed=seed)
    c = server.toy.lm.generate(p, index, server.toy.encoding)
    return c.text, c.finish_reason, c.tokens


def triples(res: SampleResult) -> list[tuple[str, str | None, int]]:
    return [(c.text, c.finish_reason, c.num_tokens) for c in res.continuations]


def continued_partial(body: dict[str, Any]) -> str:
    """The partial answer a request asked to continue ("" for a plain request)."""
    last = body["messages"][-1]
    return last["content"] if last["role"] == "assistant" else ""


async def test_continue_final_message_sends_the_partial_as_the_final_turn_and_n_in_one_request() -> None:
    params = SamplingParams(n=3, max_tokens=6, temperature=0.9, stop=["."], seed=5)
    async with FakeChatServer("vllm") as server, OpenAIChatUpstream(chat_config(server)) as up:
        res = await up.sample(CONV, PARTIAL, params)
    [body] = server.requests
    assert body["messages"] == [*CONV.messages, {"role": "assistant", "content": PARTIAL}]
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert (body["model"], body["n"], body["seed"], body["max_tokens"], body["temperature"], body["top_p"],
            body["stop"]) == ("toy-chat", 3, 5, 6, 0.9, 1.0, ["."])
    assert triples(res) == [toy(server, CONV, PARTIAL, params, 5, i) for i in range(3)]
    for c in res.continuations:  # a cut chunk is exactly max_tokens; a finished one is counted
        assert c.num_tokens == (6 if c.finish_reason == "length" else count_tokens(c.text))
        assert c.finished == (c.finish_reason != "length")
    assert res.calls == 1 and up.usage == res.usage and up.api_calls == 1
    assert res.usage.completion_tokens == server.responses[0]["usage"]["completion_tokens"]


@pytest.mark.parametrize("dialect", ["deepseek", "mistral"])
async def test_prefix_dialects_mark_the_final_turn_and_put_the_seed_where_the_api_wants_it(dialect: str) -> None:
    params = SamplingParams(n=3, max_tokens=6, seed=5)
    async with FakeChatServer(dialect) as server, OpenAIChatUpstream(chat_config(server)) as up:  # type: ignore
        res = await up.sample(CONV, PARTIAL, params)
        again = await up.sample(CONV, PARTIAL, params)
    final = {"role": "assistant", "content": PARTIAL, "prefix": True}
    for body in server.requests:
        assert body["messages"] == [*CONV.messages, final]
        assert "continue_final_message" not in body and "add_generation_prompt" not in body
    if dialect == "mistral":  # n honoured in one request; the seed is random_seed, never seed
        assert [(b.get("n"), b["random_seed"], "seed" in b) for b in server.requests] == [(3, 5, False)] * 2
        assert triples(res) == [toy(server, CONV, PARTIAL, params, 5, i) for i in range(3)]
        assert res.calls == 1
    else:  # n refused with a 400: three seeded n=1 requests, and n not asked again
        assert [b.get("n", 1) for b in server.requests] == [3, 1, 1, 1, 1, 1, 1]
        assert server.responses[0] is None and not up.n_choices.on
        seeds = [sample_seed(5, i) for i in range(3)]
        assert [b["seed"] for b in server.requests[1:4]] == seeds and seeds[0] == 5
        assert triples(res) == [toy(server, CONV, PARTIAL, params, s, 0) for s in seeds]
        assert res.calls == 3 and up.api_calls == 6
    assert triples(again) == triples(res)


async def test_a_server_ignoring_n_is_detected_only_after_two_short_answers() -> None:
    async with FakeChatServer("ignores-n") as server, OpenAIChatUpstream(chat_config(server)) as up:
        params = SamplingParams(n=4, max_tokens=5, seed=10)
        first = await up.sample(CONV, PARTIAL, params)
        assert [b.get("n", 1) for b in server.requests] == [4, 1, 1, 1]  # the 3 missing, in parallel
        assert up.n_choices.on  # one short answer is not proof
        await up.sample(CONV, PARTIAL, SamplingParams(n=2, max_tokens=5))
        assert not up.n_choices.on  # two in a row are
        await up.sample(CONV, PARTIAL, SamplingParams(n=2, max_tokens=5))
        assert [b.get("n", 1) for b in server.requests[6:]] == [1, 1]
    assert triples(first) == [toy(server, CONV, PARTIAL, params, sample_seed(10, i), 0) for i in range(4)]
    assert first.calls == 4 and len({c.text for c in first.continuations}) > 1


async def test_reasoning_never_reaches_the_answer_nor_its_token_count() -> None:
    params = SamplingParams(n=4, max_tokens=30, seed=3)
    async with FakeChatServer("deepseek", eos_prob=0.4) as server:
        async with OpenAIChatUpstream(chat_config(server)) as up:
            res = await up.sample(CONV, PARTIAL, params)
        assert all(r["choices"][0]["message"]["reasoning_content"] == REASONING for r in server.responses[1:])
        async with OpenAIChatUpstream(chat_config(server, extra_body={"thinking": {"type": "disabled"}})) as up:
            plain = await up.sample(CONV, PARTIAL, params)
        assert server.requests[-1]["thinking"] == {"type": "disabled"}
        assert "reasoning_content" not in server.responses[-1]["choices"][0]["message"]
    assert triples(res) == triples(plain) == [toy(server, CONV, PARTIAL, params, sample_seed(3, i), 0)
                                              for i in range(4)]
    assert any(c.finished for c in res.continuations)  # counted from the text, not completion_tokens
    assert all("REASONING" not in c.text for c in res.continuations)
    reasoning = count_tokens(REASONING)
    assert res.usage.completion_tokens == sum(c.num_tokens for c in res.continuations) + 4 * reasoning  # billed
    async with FakeChatServer("vllm", reasoning=True) as server, OpenAIChatUpstream(chat_config(server)) as up:
        res = await up.sample(CONV, PARTIAL, SamplingParams(n=1, max_tokens=30, seed=3))
        assert server.responses[0]["choices"][0]["message"]["reasoning"] == REASONING
    assert triples(res) == [toy(server, CONV, PARTIAL, SamplingParams(n=1, max_tokens=30), 3, 0)]


async def test_content_as_parts_null_or_absent_reads_as_text_or_empty() -> None:
    def rewrite(answer: dict[str, Any]) -> dict[str, Any]:
        c0, c1, c2, c3 = answer["choices"]
        c0["message"]["content"] = [{"type": "thinking", "thinking": [{"type": "text", "text": "REASONING"}]},
                                    {"type": "text", "text": c0["message"]["content"]}]  # Mistral's reasoning models
        c1["message"]["content"], c1["finish_reason"] = None, "length"  # spent the chunk thinking
        del c2["message"]
        c2["finish_reason"] = "stop"
        c3["finish_reason"] = "model_length"  # Mistral: the context window is full
        return answer

    params = SamplingParams(n=4, max_tokens=6, seed=2)
    async with FakeChatServer("mistral") as server, OpenAIChatUpstream(chat_config(server)) as up:
        server.rewrite = rewrite
        res = await up.sample(CONV, PARTIAL, params)
    expected = [toy(server, CONV, PARTIAL, params, 2, i) for i in range(4)]
    c0, c1, c2, c3 = res.continuations
    assert c0.text == expected[0][0] and c0.num_tokens == (6 if c0.finish_reason == "length" else count_tokens(c0.text))
    assert c1 == Continuation("", False, 0, "length")  # a stalled beam, not 6 tokens of nothing
    assert c2 == Continuation("", True, 0, "stop")
    assert c3 == Continuation(expected[3][0], False, count_tokens(expected[3][0]), "model_length")


async def test_extra_body_adds_fields_but_never_overrides_the_searchs() -> None:
    extra = {"chat_template_kwargs": {"enable_thinking": False}, "top_k": 20, "temperature": 2.0,
             "model": "other", "continue_final_message": False}
    async with FakeChatServer("vllm") as server, OpenAIChatUpstream(chat_config(server, extra_body=extra)) as up:
        await up.sample(CONV, PARTIAL, SamplingParams(n=1, max_tokens=4, temperature=0.5))
    [body] = server.requests
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["top_k"] == 20
    assert (body["temperature"], body["model"], body["continue_final_message"]) == (0.5, "toy-chat", True)


async def test_held_trailing_whitespace_is_joined_back_without_doubling() -> None:
    partial = " Once upon a "
    params = SamplingParams(n=2, max_tokens=5, seed=4)
    async with FakeChatServer("vllm", strip_final_whitespace=True) as server:
        async with OpenAIChatUpstream(chat_config(server, hold_trailing_whitespace=True)) as up:
            held = await up.sample(CONV, partial, params)
        async with OpenAIChatUpstream(chat_config(server)) as up:
            naive = await up.sample(CONV, partial, params)
    assert server.requests[0]["messages"][-1]["content"] == " Once upon a"  # sent without it
    raw = [t for t, _, _ in (toy(server, CONV, " Once upon a", params, 4, i) for i in range(2))]
    assert all(r.startswith(" ") for r in raw)
    assert [partial + c.text for c in held.continuations] == [" Once upon a" + r for r in raw]  # exact
    assert all("a  " in partial + c.text for c in naive.continuations)  # what holding it back prevents


@pytest.mark.parametrize("dialect", ["vllm", "deepseek", "mistral"])
async def test_an_empty_partial_is_a_plain_chat_request(dialect: str) -> None:
    params = SamplingParams(n=1, max_tokens=6, seed=9)
    async with FakeChatServer(dialect) as server, OpenAIChatUpstream(chat_config(server)) as up:  # type: ignore
        res = await up.sample(CONV, "", params)
    [body] = server.requests
    assert body["messages"] == list(CONV.messages)
    assert not {"continue_final_message", "add_generation_prompt"} & body.keys()
    assert triples(res) == [toy(server, CONV, "", params, 9, 0)]
    # What the model sees is what it would see continuing an empty assistant turn:
    assert render([*CONV.messages, {"role": "assistant", "content": ""}], True) == render(list(CONV.messages), False)


@pytest.mark.parametrize("dialect", ["vllm", "deepseek", "mistral"])
async def test_search_over_chat_returns_the_servers_chunks_concatenated_exactly(dialect: str) -> None:
    scorer = FnScorer(lambda text, finished: float(len(text)))
    cfg = SearchConfig(w=2, k=2, l=4, max_new_tokens=12, seed=1)
    async with FakeChatServer(dialect) as server, OpenAIChatUpstream(chat_config(server)) as up:  # type: ignore
        r = await search(Conversation.instruction("Tell me a story"), up, scorer, cfg)
    answered = [(continued_partial(b), a) for b, a in zip(server.requests, server.responses) if a is not None]
    assert len(answered) == r.calls
    texts = {n.text for n in r.nodes.values()}
    assert all(p in texts for p, _ in answered)  # every request continued a beam
    chunks = []
    for node in r.path:  # each chunk is a choice the server returned for its parent's text
        parent = r.nodes[r.nodes[node].parent].text  # type: ignore[index]
        returned = [c["message"]["content"] for p, a in answered if p == parent for c in a["choices"]]
        assert r.nodes[node].chunk in returned
        chunks.append(r.nodes[node].chunk)
    assert r.text == "".join(chunks) and len(r.path) >= 2
    assert r.tokens == count_tokens(r.text)


async def test_make_upstream_builds_it_and_probe_says_why_not() -> None:
    async with FakeChatServer("vllm") as server:
        up = make_upstream(chat_config(server))
        assert isinstance(up, OpenAIChatUpstream)
        async with up:
            assert await up.probe() == Probe("reachable")
        async with OpenAIChatUpstream(chat_config(server, model="other")) as up:
            assert await up.probe() == Probe("model unknown", "the upstream does not list 'other'")
        dead = server.base_url
    async with OpenAIChatUpstream(chat_config(server, base_url=dead)) as up:
        assert await up.probe() == Probe("unreachable", "APIConnectionError")


@pytest.mark.parametrize("dialect, body, status, param", [
    ("vllm", {"continue_final_message": True}, 400, "continue_final_message"),  # add_generation_prompt defaults true
    ("vllm", {"continue_final_message": True, "add_generation_prompt": False, "last": "user"}, 400,
     "continue_final_message"),
    ("deepseek", {"prefix_on": 0}, 400, "messages.0"),
    ("deepseek", {"n": 2}, 400, "n"),
    ("mistral", {"seed": 1}, 422, "seed"),
])
async def test_the_fake_refuses_what_its_provider_refuses(dialect: str, body: dict[str, Any], status: int,
                                                         param: str) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " the"}]
    if body.pop("last", None) == "user":
        messages = messages[:1]
    if (i := body.pop("prefix_on", None)) is not None:
        messages[i]["prefix"] = True
    async with FakeChatServer(dialect) as server:  # type: ignore[arg-type]
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            await client.post("/chat/completions", body={"model": "toy-chat", "messages": messages, **body},
                              cast_to=dict)
        await client.close()
    assert err.value.status_code == status and err.value.body["param"] == param  # type: ignore[index]


async def test_client_errors_fail_at_once_and_transient_ones_are_retried() -> None:
    async with FakeChatServer("mistral") as server:
        async with OpenAIChatUpstream(chat_config(server, seed_param="seed")) as up:  # a misconfigured seed field
            with pytest.raises(UpstreamError) as refused:
                await up.sample(CONV, PARTIAL, SamplingParams(n=1, max_tokens=3, seed=1))
            assert (refused.value.status, refused.value.retryable) == (422, False)
        assert len(server.requests) == 1
    async with FakeChatServer("vllm", failures=[429, 500]) as server, OpenAIChatUpstream(chat_config(server)) as up:
        res = await up.sample(CONV, PARTIAL, SamplingParams(n=2, max_tokens=3))
    assert len(server.requests) == 3 and len(res.continuations) == 2 and res.calls == 1


async def test_context_window_caps_max_tokens_and_a_full_window_sends_nothing() -> None:
    conv = Conversation.instruction(" the cat sat on the mat")  # 6 tokens
    async with FakeChatServer("vllm") as server:
        async with OpenAIChatUpstream(chat_config(server, context_window=12)) as up:
            await up.sample(conv, " the dog", SamplingParams(n=1, max_tokens=50))  # 2 more
            full = await up.sample(conv, " the dog ran" * 2, SamplingParams(n=2, max_tokens=50))
    assert [b["max_tokens"] for b in server.requests] == [4]
    assert full.calls == 0 and full.continuations == [Continuation("", False, 0, "length")] * 2
