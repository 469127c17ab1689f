"""A fake chat completions API on 127.0.0.1 that continues assistant turns, in a provider's dialect.

Why: the chat upstream family (proxy.upstreams.openai_chat) must be tested through the real
openai client against the wire rules of the providers it targets, without network, keys or
weights, and with answers a test can recompute exactly. The rules below are written from the
providers' documentation (what they refuse, where the seed goes, what they add):

  vllm       `continue_final_message: true` continues the final message, which must be from the
             assistant, and needs `add_generation_prompt: false` (both true is a 400, as vLLM
             says); n and `seed` honoured; with `reasoning=True`, a `reasoning` field is added
             (newer vLLM with a reasoning parser).
  deepseek   `"prefix": true` on the final assistant message continues it (the beta base URL);
             prefix on any other message is a 400; n other than 1 is a 400 naming n; every
             choice carries `reasoning_content` (and bills it) unless the body says
             `"thinking": {"type": "disabled"}`; `seed` honoured (an assumption: the docs list
             no seed, the fake needs reproducible answers).
  mistral    `prefix` as DeepSeek; the seed is `random_seed`, and any field outside the schema
             (`seed` included) is a 422, as a schema-validating API answers; n honoured.
  ignores-n  OpenRouter-like: a final assistant message is continued (prefill), n is accepted
             and silently answered with one choice.

Prompt cache (deterministic, simpler than any provider's): the prompt's toy tokens that a prompt
answered before this one arrived also began with (the longest shared token prefix) are cached,
the rest are not; so parallel twins find nothing of each other's (`latency_s` makes them overlap).
Where each dialect reports it: vllm in `usage.prompt_tokens_details.cached_tokens`, only with
`prompt_tokens_details=True` (vLLM's --enable-prompt-tokens-details); deepseek as
`prompt_cache_hit_tokens` and `prompt_cache_miss_tokens`; mistral in
`prompt_tokens_details.cached_tokens`; ignores-n (OpenRouter) there too, with every uncached token
counted as written (`prompt_tokens_details.cache_write_tokens`, as a route that bills writes says).
`prompt_tokens` counts every prompt token in each dialect.

The "model" is the toy Markov chain (proxy.testing.toy_model) over the chat rendered as text by
`render`: a turn is `<role>content</role>`, the continued final turn is left open, a new turn is
an open `<assistant>`. So continuing an empty assistant turn and starting a new one see the same
text, and continuing text that was extended by an earlier answer samples as the longer answer
would (the toy looks at the last two words). Choice i of a seeded request samples with
`proxy.types.choice_seed(prompt, seed, i)`, as the loopback completions server does.

Tools, tool results, structured output, image parts and streaming follow OpenAI's reference in
every dialect (proxy.testing.fake_chat_features).

Bookkeeping: `requests` (every JSON object body, refused ones included) and `responses` (the
answer body to each of them, None where it was refused). `rewrite` may edit an
answer body before it goes out (null contents, odd finish reasons); `failures` is a queue of
HTTP statuses to answer first. Only tests and benchmarks import this module.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

from aiohttp import web

from proxy.protocol.model_requests import CompletionParams
from proxy.serving.errors import ApiError
from proxy.serving.site import listen
from proxy.testing.cache_rules import shared_prefix
from proxy.testing.fake_chat_features import (
    FINISH_TOOL_CALLS,
    check_messages,
    chosen_tool,
    content_text,
    formatted,
    stream_events,
    tool_call,
)
from proxy.testing.toy_model import ToyBackend

Dialect = Literal["vllm", "deepseek", "mistral", "ignores-n"]
REASONING = "Thinking it over: REASONING-MARKER the user wants a story."
"""The reasoning a DeepSeek choice carries: words outside the toy vocabulary, easy to spot."""
MISTRAL_FIELDS = frozenset({
    "model", "messages", "max_tokens", "temperature", "top_p", "stop", "n", "random_seed", "stream",
    "safe_prompt", "response_format", "tools", "tool_choice", "presence_penalty", "frequency_penalty",
    "parallel_tool_calls", "prediction", "prompt_mode", "prompt_cache_key"})
SEED_FIELD = {"vllm": "seed", "deepseek": "seed", "mistral": "random_seed", "ignores-n": "seed"}


def render(messages: Sequence[dict[str, Any]], continue_final: bool) -> str:
    """The chat as the toy model reads it: closed turns, then the open final turn (continued) or
    a new open assistant turn."""
    closed = messages[:-1] if continue_final else messages
    text = "".join(f"<{m['role']}>{content_text(m.get('content'))}</{m['role']}>" for m in closed)
    if continue_final:
        return text + f"<{messages[-1]['role']}>{content_text(messages[-1].get('content'))}"
    return text + "<assistant>"


def _bad(message: str, param: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, message, param=param, code="invalid_request_error" if status == 400 else "extra_forbidden")


class FakeChatServer:
    """POST /v1/chat/completions and GET /v1/models in `dialect`; use as `async with
    FakeChatServer("vllm") as s:` and point a client at `s.base_url`."""

    def __init__(self, dialect: Dialect = "vllm", *, model: str = "toy-chat", eos_prob: float = 0.08,
                 strip_final_whitespace: bool = False, reasoning: bool = False,
                 failures: Sequence[int] = (), prompt_tokens_details: bool = False, latency_s: float = 0.0) -> None:
        self.dialect = dialect
        self.model = model
        self.toy = ToyBackend(eos_prob=eos_prob)
        self.strip_final_whitespace = strip_final_whitespace
        """Trim the continued turn's trailing whitespace (templates that trim, older transformers)."""
        self.reasoning = reasoning or dialect == "deepseek"
        self.prompt_tokens_details = prompt_tokens_details
        """vllm: report cached tokens (vLLM's --enable-prompt-tokens-details); the others always do."""
        self.seen: list[list[int]] = []
        """The token ids of every prompt answered, for the prompt cache."""
        self.failures: deque[int] = deque(failures)
        self.latency_s = latency_s
        """Each answer waits this long after its request arrived (so parallel requests overlap)."""
        self.rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.requests: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any] | None] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> "FakeChatServer":
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner, root = await listen(app, "127.0.0.1", 0, shutdown_timeout=0.5, access_log=None)
        self.base_url = f"{root}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                               "owned_by": f"fake-{self.dialect}"}]})

    async def _unknown(self, request: web.Request) -> web.Response:
        return ApiError(404, f"Unknown route: {request.method} {request.path}", code="unknown_url").response()

    async def _chat(self, request: web.Request) -> web.Response:
        known = len(self.seen)  # what a request finds in the cache is what was there when it came
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return ApiError(400, "We could not parse the JSON body of your request.", code="invalid_json").response()
        if not isinstance(body, dict):
            return _bad("The request body must be a JSON object.").response()
        slot = len(self.responses)
        self.requests.append(body)
        self.responses.append(None)
        if self.failures:
            status = self.failures.popleft()
            return ApiError(status, f"injected failure: HTTP {status}").response()
        try:
            answer = self.answer(body, known)
        except ApiError as e:
            return e.response()
        if self.rewrite is not None:
            answer = self.rewrite(answer)
        self.responses[slot] = answer
        if body.get("stream"):
            return await self._stream(request, answer, bool((body.get("stream_options") or {}).get("include_usage")))
        return web.json_response(answer)

    async def _stream(self, request: web.Request, answer: dict[str, Any], include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in stream_events(answer, include_usage):
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def continues(self, body: dict[str, Any]) -> bool:
        """Is the final message continued (after the dialect's checks), or answered by a new turn?"""
        messages = body["messages"]
        last_is_assistant = messages[-1].get("role") == "assistant"
        if self.dialect == "vllm":
            cont = bool(body.get("continue_final_message", False))
            if cont and body.get("add_generation_prompt", True):
                raise _bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           "continue_final_message")
            if cont and not last_is_assistant:
                raise _bad("continue_final_message is set but the final message is not from the assistant.",
                           "continue_final_message")
            return cont
        if self.dialect == "ignores-n":
            return last_is_assistant
        for i, m in enumerate(messages):
            if m.get("prefix") and (i != len(messages) - 1 or m.get("role") != "assistant"):
                raise _bad("prefix: true is only allowed on the last message, from the assistant.", f"messages.{i}")
        return last_is_assistant and bool(messages[-1].get("prefix"))

    def check(self, body: dict[str, Any]) -> None:
        """The request rules every dialect shares, and the dialect's own fields."""
        if self.dialect == "mistral":
            for key in body:
                if key not in MISTRAL_FIELDS:
                    raise _bad(f"{key}: Extra inputs are not permitted", key, status=422)
        check_messages(body.get("messages"))
        for key, kind in (("max_tokens", int), ("n", int)):
            value = body.get(key)
            if value is not None and (not isinstance(value, kind) or value < 1):
                raise _bad(f"{key} must be a positive integer.", key)
        if self.dialect == "deepseek" and body.get("n", 1) != 1:
            raise _bad("Invalid n: only n=1 is supported.", "n")

    def answer(self, body: dict[str, Any], known: int | None = None) -> dict[str, Any]:
        """The whole 200 answer to `body`, or ApiError; the cache holds the first `known` prompts
        answered (all by default)."""
        self.check(body)
        tool = chosen_tool(body)
        messages = [dict(m) for m in body["messages"]]
        continuing = self.continues(body)
        if continuing and self.strip_final_whitespace:
            messages[-1]["content"] = (messages[-1].get("content") or "").rstrip()
        prompt = render(messages, continuing)
        n = 1 if self.dialect == "ignores-n" else body.get("n") or 1
        stops = body.get("stop") or []
        params = CompletionParams(model=self.model, prompt=prompt, n=n, max_tokens=body.get("max_tokens") or 64,
                                  stop=tuple([stops] if isinstance(stops, str) else stops),
                                  temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                                  seed=body.get(SEED_FIELD[self.dialect]))
        choices = [self.toy.lm.generate(params, i, self.toy.encoding) for i in range(n)]
        thinking = self.reasoning and body.get("thinking") != {"type": "disabled"}
        reasoning_tokens = len(self.toy.encoding.encode_ordinary(REASONING)) * n if thinking else 0
        field = "reasoning_content" if self.dialect == "deepseek" else "reasoning"
        out = []
        for i, c in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": formatted(body, c.text)}
            reason = c.finish_reason
            if tool is not None:
                message.update(content=None, tool_calls=[tool_call(i, tool, c.text)])
                reason = FINISH_TOOL_CALLS
            if thinking:
                message[field] = REASONING
            out.append({"index": i, "message": message, "finish_reason": reason})
        ids = self.toy.encoding.encode_ordinary(prompt)
        completion_tokens = sum(c.tokens for c in choices) + reasoning_tokens
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                 "total_tokens": len(ids) + completion_tokens,
                 "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}, **self.cache_usage(ids, known)}
        return {"id": f"chatcmpl-fake-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model, "choices": out, "usage": usage}

    def cache_usage(self, ids: list[int], known: int | None = None) -> dict[str, Any]:
        """The dialect's cache fields for a prompt of token `ids` (see the module's docstring),
        read from the first `known` prompts remembered; the prompt is then remembered."""
        cached = max((shared_prefix(ids, seen) for seen in self.seen[:known]), default=0)
        self.seen.append(ids)
        if self.dialect == "deepseek":
            return {"prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": len(ids) - cached}
        if self.dialect == "ignores-n":
            return {"prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": len(ids) - cached}}
        if self.dialect == "mistral" or self.prompt_tokens_details:
            return {"prompt_tokens_details": {"cached_tokens": cached}}
        return {}
