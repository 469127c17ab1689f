"""POST /v1/responses through the real openai SDK (`responses.create`, streamed and not, and its
`responses.stream` helper), in every mode: each answer is checked against the chat route's
answer to the same messages on the same seeded loopback upstream, which the Responses request
must become; streams against the whole answer; refusals name their field."""
from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import AppConfig
from proxy.testing.toy_server import ToyCompletionsServer
from tests.doubles import FnScorer
from tests.test_every_door import FAMILIES, MODES, score
from tests.test_server import MODEL, app_config, distinct_words, metric, raw_post, served

GUIDED = {"w2s": {"l": 8}}
ALIASES = [MODEL, f"{MODEL}+bon4", f"{MODEL}+cbs-w2k2l30"]


def without_wall(w2s: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in w2s.items() if k != "wall_s"}


@pytest.mark.parametrize("model", ALIASES)
async def test_a_response_is_the_chat_answer_to_the_same_messages(loopback: ToyCompletionsServer, model: str) -> None:
    async with served(app_config(loopback), scorer=FnScorer(distinct_words)) as (srv, client):
        r = await client.responses.create(model=model, instructions="Be brief.", input="Name a pet.",
                                          max_output_tokens=14, temperature=0.9, top_p=0.95,
                                          extra_body={"seed": 5, **GUIDED})
        asked = [q["prompt"] for q in loopback.requests]
        loopback.requests.clear()
        c = await client.chat.completions.create(
            model=model, max_tokens=14,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a pet."}],
            temperature=0.9, top_p=0.95, seed=5, extra_body=GUIDED)
        text = srv.metrics.render()[0].decode()
    assert asked == [q["prompt"] for q in loopback.requests]  # the same upstream calls
    assert asked[0] == "Be brief.\n\nInstruction: Name a pet.\nOutput:"
    assert r.object == "response" and r.model == model and r.id.startswith("resp_")
    assert r.output_text == c.choices[0].message.content and len(r.output) == 1
    item = r.output[0]
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    finished = c.choices[0].finish_reason == "stop"
    assert r.status == item.status == ("completed" if finished else "incomplete")
    assert r.incomplete_details is None if finished else r.incomplete_details.reason == "max_output_tokens"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
        c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens)
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert (r.instructions, r.max_output_tokens, r.temperature, r.top_p) == ("Be brief.", 14, 0.9, 0.95)
    assert without_wall(r.model_extra["w2s"]) == without_wall(c.model_extra["w2s"])
    assert metric(text, "w2s_requests_total", endpoint="/v1/responses", status="200") == 1


async def test_input_messages_with_parts_render_as_chat_messages(loopback: ToyCompletionsServer) -> None:
    turns: list[Any] = [
        {"role": "developer",
         "content": [{"type": "input_text", "text": "Be "}, {"type": "input_text", "text": "brief."}]},
        {"type": "message", "role": "user", "content": "Name a pet."},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "A cat.", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Another."}]}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a pet."},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Another."}]
    scorer = FnScorer(distinct_words)
    async with served(app_config(loopback), scorer=scorer) as (_, client):
        r = await client.responses.create(model=f"{MODEL}+bon4", input=turns, max_output_tokens=8,
                                          extra_body={"seed": 2})
        c = await client.chat.completions.create(model=f"{MODEL}+bon4", messages=messages,  # type: ignore[arg-type]
                                                 max_tokens=8, seed=2)
    assert loopback.requests[0]["prompt"] == loopback.requests[1]["prompt"]
    assert scorer.prompts == [messages, messages]
    assert r.output_text == c.choices[0].message.content


def check_stream(events: list[Any], whole: Any) -> Any:
    """The events are the Responses API's, in order and numbered, and say what `whole` said."""
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    final_type = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          final_type]
    assert set(types[4:-4]) <= {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == events[-3].part.text == whole.output_text
    final = events[-1].response
    assert final.id == events[0].response.id and final.output[0].id == events[2].item.id == events[4].item_id
    assert final.output_text == whole.output_text and final.usage == whole.usage and final.status == whole.status
    assert without_wall(final.model_extra["w2s"]) == without_wall(whole.model_extra["w2s"])
    return final


@pytest.mark.parametrize("model", ALIASES)
async def test_a_stream_says_what_the_whole_response_said(loopback: ToyCompletionsServer, model: str) -> None:
    body: dict[str, Any] = dict(model=model, input="Tell a story.", max_output_tokens=30,
                                extra_body={"seed": 11, **GUIDED})
    async with served(app_config(loopback), scorer=FnScorer(distinct_words)) as (_, client):
        whole = await client.responses.create(**body)
        events = [e async for e in await client.responses.create(stream=True, **body)]
        check_stream(events, whole)
        finished = await client.responses.create(**{**body, "max_output_tokens": 200})
        assert finished.status == "completed"  # the helper's final response needs response.completed
        async with client.responses.stream(**{**body, "max_output_tokens": 200}) as stream:
            helped = [e async for e in stream]
            final = await stream.get_final_response()
    check_stream(helped, finished)
    assert final.output_text == finished.output_text and final.id == helped[0].response.id
    if model != MODEL:
        assert whole.status == "incomplete"  # a search cut at max_output_tokens: response.incomplete


async def test_the_wire_has_event_lines_and_no_done(loopback: ToyCompletionsServer) -> None:
    async with served(app_config(loopback)) as (srv, _):
        async with aiohttp.ClientSession() as s:
            async with s.post(srv.base_url + "/responses", json={"model": MODEL, "input": "hi", "stream": True,
                                                                   "max_output_tokens": 5}) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
                raw = (await r.read()).decode()
    blocks = [b for b in raw.split("\n\n") if b]
    assert "[DONE]" not in raw
    for block in blocks:
        event, data = block.split("\n")
        assert event.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]


async def test_a_failure_mid_stream_raises_in_the_client(loopback: ToyCompletionsServer) -> None:
    async with served(app_config(loopback, max_attempts=2)) as (_, client):
        loopback.failures.extend([500, 500])
        stream = await client.responses.create(model=MODEL, input="x", stream=True, max_output_tokens=5)
        with pytest.raises(openai.APIError) as e:
            [e async for e in stream]
    assert e.value.body["code"] == "upstream_error"


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "name": "f", "parameters": {}}]),
    ("tool_choice", "required"),
    ("previous_response_id", "resp_1"),
    ("conversation", "conv_1"),
    ("background", True),
    ("prompt", {"id": "pmpt_1"}),
    ("top_logprobs", 2),
    ("include", ["message.output_text.logprobs"]),
    ("text", {"format": {"type": "json_object"}}),
    ("max_output_tokens", 0),
    ("seeds", 1),
    ("input", [{"type": "function_call_output", "call_id": "c", "output": "x"}]),
    ("input", [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]),
    ("input", [{"role": "assistant", "content": "last"}]),
    ("w2s", {"beams": 2}),
])
async def test_what_the_search_cannot_honour_is_400_naming_the_field(loopback: ToyCompletionsServer, field: str,
                                                                    value: Any) -> None:
    async with served(app_config(loopback), scorer=FnScorer(distinct_words)) as (srv, _):
        for model in (MODEL, f"{MODEL}+bon4"):
            status, answer = await raw_post(srv, "/responses", json.dumps(
                {"model": model, "input": "hi", field: value}).encode())
            assert status == 400, answer
            assert answer["error"]["param"].split(".")[0] == field, answer
            assert answer["error"]["type"] == "invalid_request_error"
    assert loopback.requests == []


async def test_harmless_fields_are_accepted(loopback: ToyCompletionsServer) -> None:
    harmless = dict(store=False, metadata={"k": "v"}, user="u", service_tier="auto", prompt_cache_key="k",
                    safety_identifier="s", parallel_tool_calls=False, reasoning={"effort": "low"},
                    truncation="auto", max_tool_calls=3, tools=[], tool_choice="auto", include=[],
                    text={"format": {"type": "text"}, "verbosity": "low"}, background=False)
    async with served(app_config(loopback), scorer=FnScorer(distinct_words)) as (_, client):
        plain = await client.responses.create(model=f"{MODEL}+bon4", input="hi", max_output_tokens=6,
                                              extra_body={"seed": 1})
        r = await client.responses.create(model=f"{MODEL}+bon4", input="hi", max_output_tokens=6,
                                          extra_body={"seed": 1}, **harmless)  # type: ignore[arg-type]
        events = [e async for e in await client.responses.create(
            model=MODEL, input="hi", max_output_tokens=6, stream=True,
            stream_options={"include_obfuscation": False})]
    assert r.output_text == plain.output_text
    assert events[-1].type in ("response.completed", "response.incomplete")


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_every_family_answers_responses_in_every_mode(family: str) -> None:
    async with FAMILIES[family]() as upstream:
        cfg = AppConfig.model_validate({"upstream": upstream, "server": {"modes": MODES, "caps": {"min_l": 4}}})
        model = cfg.upstream.model
        async with served(cfg, scorer=FnScorer(score)) as (_, client):
            for alias in (model, f"{model}+bon4", f"{model}+cbs"):
                whole = await client.responses.create(model=alias, input="Tell me about the dog.",
                                                      max_output_tokens=12, extra_body={"seed": 5})
                assert whole.output_text or alias == model, alias  # plain sampling may end at once
                assert whole.usage.input_tokens > 0 and whole.model_extra["w2s"]["steps"] >= 1
                events = [e async for e in await client.responses.create(
                    model=alias, input="Tell me about the dog.", max_output_tokens=12, stream=True,
                    extra_body={"seed": 5})]
                deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
                assert deltas == events[-1].response.output_text
                if cfg.upstream.kind != "anthropic":  # seeded: the stream is the whole answer
                    assert deltas == whole.output_text, alias


async def test_errors_name_the_responses_fields(loopback: ToyCompletionsServer) -> None:
    """A limit on the answer is `max_output_tokens` here, never the chat route's `max_tokens`."""
    async with served(app_config(loopback)) as (_, client):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model=MODEL, input="Hi.", max_output_tokens=1_000_000)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "max_output_tokens"
    assert error["message"].startswith("max_output_tokens = 1000000 exceeds") and "max_tokens" not in error["message"]
