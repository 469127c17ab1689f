"""How we read what an upstream's /v1/completions and /v1/chat/completions answer.

Lenient: every provider adds fields of its own (vLLM's `stop_reason`, OpenRouter's `provider`),
and what we need of an answer is only each choice's text and finish reason, and the usage with
its prompt-cache counts (`AnswerUsage`; a count absent or null reads as 0); extra fields are
ignored. (What our own servers accept and write is the
wire format in proxy.protocol.)

Chat: the answer text is `message.content` and nothing else: a reasoning model's thinking
(`reasoning_content` at DeepSeek and older vLLM, `reasoning` at newer vLLM and OpenRouter,
"thinking" parts of a Mistral content list) is never part of the answer the search extends. It
is read only to know that it was there, since then `usage.completion_tokens` counts more than
the answer. A content that is null or absent reads as "" (a choice cut before any answer text,
or a provider that writes null for an empty message) rather than failing the whole response.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _count(value: Any) -> int:
    """A token count as a provider wrote it: absent, null or not a number reads as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class PromptDetails(_Lenient):
    """`usage.prompt_tokens_details`: OpenAI, Mistral, Groq, vLLM (`--enable-prompt-tokens-details`)
    and OpenRouter write `cached_tokens` (read from the cache); OpenRouter also `cache_write_tokens`."""

    cached_tokens: Any = None
    cache_write_tokens: Any = None


class AnswerUsage(_Lenient):
    """The usage of an OpenAI-style answer, cache counts included where the provider writes them:
    `prompt_tokens_details` (above), or DeepSeek's `prompt_cache_hit_tokens` (read from the cache)
    and `prompt_cache_miss_tokens` (when both are there, the prompt is their sum)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptDetails | None = None
    prompt_cache_hit_tokens: Any = None
    prompt_cache_miss_tokens: Any = None
    cached_from_header: int | None = None
    """Fireworks' `fireworks-cached-prompt-tokens` response header (set by the caller that sees
    the headers, proxy.upstreams.openai_http.read_as); used where the body says nothing."""

    @field_validator("prompt_tokens_details", mode="before")
    @classmethod
    def _details_or_none(cls, value: Any) -> Any:
        return value if isinstance(value, (dict, PromptDetails)) else None

    @property
    def cached_tokens(self) -> int:
        if self.prompt_cache_hit_tokens is not None:
            return _count(self.prompt_cache_hit_tokens)
        details = self.prompt_tokens_details
        if details is not None and details.cached_tokens is not None:
            return _count(details.cached_tokens)
        return _count(self.cached_from_header)

    @property
    def cache_write_tokens(self) -> int:
        details = self.prompt_tokens_details
        return _count(details.cache_write_tokens) if details is not None else 0

    @property
    def billed_prompt_tokens(self) -> int:
        """Every prompt token billed (DeepSeek: hit + miss where both are given)."""
        if self.prompt_cache_hit_tokens is not None and self.prompt_cache_miss_tokens is not None:
            return _count(self.prompt_cache_hit_tokens) + _count(self.prompt_cache_miss_tokens)
        return self.prompt_tokens


class CompletionChoice(_Lenient):
    text: str
    index: int = 0
    finish_reason: str | None = None


class CompletionAnswer(_Lenient):
    """What we read of an upstream's completions response."""

    choices: list[CompletionChoice]
    usage: AnswerUsage | None = None


class ContentPart(_Lenient):
    """One part of a content given as a list (Mistral's reasoning models answer that way)."""

    type: str = "text"
    text: str | None = None


class AnswerMessage(_Lenient):
    content: str | list[ContentPart] | None = None
    reasoning_content: Any = None
    reasoning: Any = None

    @property
    def text(self) -> str:
        """The answer text: the content, or its text parts joined; never the reasoning."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")

    @property
    def has_reasoning(self) -> bool:
        """Did the choice carry reasoning (in a separate field or as non-text parts)?"""
        parts = self.content if isinstance(self.content, list) else []
        return bool(self.reasoning_content or self.reasoning or any(p.type != "text" for p in parts))


class ChatChoice(_Lenient):
    index: int = 0
    message: AnswerMessage = AnswerMessage()
    finish_reason: str | None = None


class TokenDetails(_Lenient):
    reasoning_tokens: int | None = 0


class ChatUsage(AnswerUsage):
    completion_tokens_details: TokenDetails | None = None

    @property
    def reasoning_tokens(self) -> int:
        details = self.completion_tokens_details
        return (details.reasoning_tokens or 0) if details is not None else 0


class ChatAnswer(_Lenient):
    """What we read of an upstream's chat completions response."""

    choices: list[ChatChoice]
    usage: ChatUsage | None = None
