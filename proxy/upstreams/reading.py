"""How we read what an upstream's /v1/completions and /v1/chat/completions answer.

Lenient: every provider adds fields of its own (DeepSeek's cache counters, vLLM's `stop_reason`,
OpenRouter's `provider`), and what we need of an answer is only each choice's text and finish
reason, and the usage; extra fields are ignored. (What our own servers accept and write is the
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

from pydantic import BaseModel, ConfigDict


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AnswerUsage(_Lenient):
    prompt_tokens: int = 0
    completion_tokens: int = 0


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
