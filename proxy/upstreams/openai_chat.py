"""OpenAI-compatible chat completions that continue a partial answer (vLLM, SGLang, DeepSeek,
Mistral, OpenRouter and other chat-only hosts).

Many strong models are served only behind POST /v1/chat/completions, where a prompt cannot be
extended as text. Their servers can still continue an assistant turn: the messages go as they
are and the partial answer goes last, as `{"role": "assistant", "content": partial}`, marked to
be continued rather than answered. How it is marked is the dialect (`OpenAIChatConfig.continuation`):

  continue_final_message  vLLM, SGLang: `"continue_final_message": true,
                          "add_generation_prompt": false` in the body (both true is refused).
  prefix                  DeepSeek (its beta base URL, https://api.deepseek.com/beta), Mistral:
                          `"prefix": true` on the final assistant message.

An empty partial answer (the first step of a search) is sent as a plain chat request: the
conversation only, no assistant turn, no marker. A template renders an empty assistant turn
that is continued exactly as the generation prompt it would add for a new one, so the model
sees the same text; but an empty final message breaks on some deployments: transformers
before the tag-based `continue_final_message` cut the rendered chat at `rindex("")`, its very
end, so the empty turn's end-of-turn token stayed in the prompt, and a strict API may refuse an
assistant message without content. A plain request is what every chat API serves.

The answer text is `choices[i].message.content` alone; reasoning fields (`reasoning_content`,
`reasoning`, Mistral's thinking parts) are ignored, since reasoning is never part of the
answer. A choice cut at `max_tokens` that returned no answer text (a reasoning model that spent
the chunk thinking, a provider that writes null) is an unfinished continuation of 0 tokens, so
the search sees a stalled beam instead of a chunk of L tokens of nothing. The seed goes under
`seed_param` (Mistral: `random_seed`; None sends none), `extra_body` adds provider fields
(DeepSeek's `{"thinking": {"type": "disabled"}}`, vLLM's `chat_template_kwargs`) under ours,
never overriding what the search decides. APIs that refuse or strip trailing whitespace in a
continued turn get the partial without it (`hold_trailing_whitespace`, proxy.upstreams.seam).

n > 1, retries (a malformed 200 included), the concurrency limit, the client and the probe are
shared with the completions family (proxy.upstreams.openai_http, proxy.upstreams.capability): one request with n, the missing
samples as parallel seeded n=1 requests where a provider refuses n (DeepSeek) or ignores it
(OpenRouter). Every beam is its own request (`sample_batch`'s default): chat APIs take one
conversation per request.

Plain-mode requests that only the upstream can honour (tools, response formats, ...) are sent
as the client wrote them (`forward`, `open_stream`; proxy.serving.passthrough decides which),
under the same retry policy, concurrency limit and billing as the search's calls.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
from pydantic import BaseModel, Field, PrivateAttr

from proxy.config import OpenAIChatConfig
from proxy.cost import count_tokens
from proxy.types import Continuation, Conversation, SampleResult, SamplingParams, Usage
from proxy.upstreams.base import conversation_key
from proxy.upstreams.capability import n_choices
from proxy.upstreams.errors import UpstreamError
from proxy.upstreams.openai_http import (
    OpenAICompatibleUpstream,
    openai_errors,
    read_as,
    refuses_n,
    usage_of,
)
from proxy.upstreams.reading import AnswerUsage, ChatAnswer, ChatChoice
from proxy.upstreams.retry import retrying
from proxy.upstreams.seam import hold_trailing_whitespace, join_held

log = logging.getLogger("w2s.upstream")

UNFINISHED = frozenset({"length", "model_length"})
"""Finish reasons of a choice the model did not end: the token limit, or (Mistral's
`model_length`) the context window."""


class OpenAIChatUpstream(OpenAICompatibleUpstream):
    """A chat completions API that continues the final assistant turn, in `cfg.continuation`'s dialect."""

    cfg: OpenAIChatConfig

    def messages(self, conversation: Conversation, partial: str) -> list[dict[str, Any]]:
        """The request's messages: the conversation, then the partial answer to continue (none
        when it is empty, see the module docstring)."""
        messages: list[dict[str, Any]] = [{"role": m["role"], "content": m["content"]} for m in conversation.messages]
        if partial:
            final: dict[str, Any] = {"role": "assistant", "content": partial}
            if self.cfg.continuation == "prefix":
                final["prefix"] = True
            messages.append(final)
        return messages

    def body(self, conversation: Conversation, partial: str, params: SamplingParams,
             max_tokens: int) -> dict[str, Any]:
        """Everything but n and the seed; `extra_body` under our fields."""
        body: dict[str, Any] = dict(self.cfg.extra_body)
        body.update(model=self.cfg.model, messages=self.messages(conversation, partial), max_tokens=max_tokens,
                    temperature=params.temperature, top_p=params.top_p)
        if params.stop:
            body["stop"] = list(params.stop)
        if partial and self.cfg.continuation == "continue_final_message":
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    async def _create(self, body: dict[str, Any], n: int, seed: int | None, cache_key: str) -> ChatAnswer:
        """One API call under the retry policy and the concurrency limit, billed as it returns."""
        body = {**body, "n": n} if n > 1 else body  # n=1 is every API's default: never sent
        return await self.call("/chat/completions", body, seed, lambda raw: read_as(ChatAnswer, raw), cache_key)

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        sent, held = hold_trailing_whitespace(partial) if self.cfg.hold_trailing_whitespace else (partial, "")
        # The prompt's tokens approximated by its texts' (a chat template adds a few per turn).
        max_tokens = self.room([m["content"] for m in conversation.messages] + [sent], params.max_tokens)
        if max_tokens < 1:  # the context window is full: nothing more can be generated
            return self.window_full(params.n)
        body = self.body(conversation, sent, params, max_tokens)
        responses = await n_choices(params.n, params.seed, self.n_choices,
                                    lambda k, seed: self._create(body, k, seed, conversation_key(conversation)),
                                    lambda r: len(r.choices), refuses_n, stagger=self.cfg.stagger_twins)
        return self.collect(responses, params.n,
                            lambda c, resp, count: self._continuation(c, resp, count, max_tokens, held))

    async def forward(self, body: dict[str, Any]) -> Forwarded:
        """A plain-mode request the search cannot honour, sent as it is (proxy.serving.passthrough):
        retried and billed like every call."""
        return await self.call("/chat/completions", body, None, Forwarded.read)

    async def open_stream(self, body: dict[str, Any]) -> ForwardedStream:
        """The same for `stream: true`: opening is retried (nothing was relayed yet), and the
        stream holds a place under the concurrency limit until it is closed."""
        async for attempt in retrying(self.cfg.max_attempts, self.cfg.backoff_initial_s, self.cfg.backoff_max_s):
            with attempt:
                await self._limit.acquire()
                try:
                    with openai_errors():
                        stream = await self.client.post("/chat/completions", body=body, cast_to=object, stream=True,
                                                        stream_cls=openai.AsyncStream[object])
                except BaseException:
                    self._limit.release()
                    raise
        return ForwardedStream(stream, self)

    def end_stream(self, usage: Usage) -> None:
        self._limit.release()
        self.record(usage)

    def _continuation(self, c: ChatChoice, resp: ChatAnswer, choices: int, max_tokens: int,
                      held: str) -> Continuation:
        raw = c.message.text
        reason = c.finish_reason
        text = join_held(held, raw) if held else raw
        if reason == "length":
            if not raw:
                log.debug("upstream %s: a choice cut at max_tokens=%d without answer text", self.name, max_tokens)
            return Continuation(text, False, max_tokens if raw else 0, reason)
        if choices == 1 and resp.usage is not None and not c.message.has_reasoning:
            used = resp.usage.completion_tokens - resp.usage.reasoning_tokens
        else:  # several choices share the usage, or it counts reasoning we cannot see: count the text
            used = count_tokens(raw, self.cfg.encoding)
        return Continuation(text, reason not in UNFINISHED, used, reason)


class Forwarded(BaseModel):
    """A forwarded request's answer: the upstream's body as it came, and what it billed."""

    choices: list[Any] = Field(min_length=1)
    usage: AnswerUsage | None = None
    _body: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def body(self) -> dict[str, Any]:
        return self._body

    @classmethod
    def read(cls, raw: httpx2.Response) -> "Forwarded":
        answer = read_as(cls, raw)
        answer._body = raw.json()
        return answer


class ForwardedStream:
    """An upstream stream being relayed: its chunks as JSON objects, then (`usage`) what it
    billed, read from the chunk that carries it. `aclose` exactly once, iterated or not: it
    ends the stream, frees its place under the concurrency limit and records the usage."""

    def __init__(self, stream: openai.AsyncStream[Any], upstream: "OpenAIChatUpstream") -> None:
        self._stream, self._upstream = stream, upstream
        self.usage = Usage()
        self._closed = False

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        with openai_errors():
            async for chunk in self._stream:
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("usage"):
                    self.usage = usage_of(AnswerUsage.model_validate(chunk["usage"]))
                yield chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.close()
        finally:
            self._upstream.end_stream(self.usage)


def refusal_of(exc: UpstreamError) -> tuple[str, str | None] | None:
    """The upstream's own message and param when it refused a field of a forwarded request (a
    400, 413 or 422), for the client whose field it is (scrubbed of keys by the caller); None for
    any other failure, which stays in our words (proxy.serving.errors)."""
    cause = exc.__cause__
    if not isinstance(cause, openai.APIStatusError) or cause.status_code not in (400, 413, 422):
        return None
    body = cause.body if isinstance(cause.body, dict) else {}
    message = body.get("message") or cause.message
    param = body.get("param")
    return str(message), str(param) if param is not None else None
