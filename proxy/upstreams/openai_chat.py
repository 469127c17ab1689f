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
"""
from __future__ import annotations

import logging
from typing import Any

from proxy.config import OpenAIChatConfig
from proxy.cost import count_tokens
from proxy.types import Continuation, Conversation, SampleResult, SamplingParams
from proxy.upstreams.base import conversation_key
from proxy.upstreams.capability import n_choices
from proxy.upstreams.openai_http import OpenAICompatibleUpstream, read_as, refuses_n
from proxy.upstreams.reading import ChatAnswer, ChatChoice
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
                                    lambda r: len(r.choices), refuses_n)
        return self.collect(responses, params.n,
                            lambda c, resp, count: self._continuation(c, resp, count, max_tokens, held))

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
