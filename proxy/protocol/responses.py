"""The OpenAI response bodies we write: the guidance server's answers, streamed chunks, model
lists and the error body, and the local model server's completions. One definition each, so a
client sees the same shapes from every server in this project."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def new_id(prefix: str) -> str:
    """`prefix` (its separator included: OpenAI writes `chatcmpl-...` but `resp_...`) and a random part."""
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(_Response):
    """OpenAI's `usage.prompt_tokens_details`: of the prompt tokens, those read from the
    upstream's prompt cache; and (as OpenRouter writes it) those written to it."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


class UsageInfo(_Response):
    """Tokens billed by the upstream for the whole search, not only the returned text.
    `prompt_tokens` counts them all, cached and written included; `prompt_tokens_details` is
    left out of the body where it is None (our model servers, which have no cache to report)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @model_serializer(mode="wrap")
    def _without_empty_details(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("prompt_tokens_details", 0) is None:
            del data["prompt_tokens_details"]
        return data


class SearchSummary(_Response):
    """The `w2s` field of a response: what the search did to produce the answer."""

    mode: str
    steps: int
    upstream_calls: int
    score: float | None
    finished: bool
    tokens: int
    """Upstream tokens in the answer."""
    cost_usd: float
    wall_s: float
    stopped_by: str | None = None
    """"budget" when a budget ended the search early (the answer is its best beam so far)."""
    cached_tokens: int = 0
    """Prompt tokens billed for the whole search that the upstream read from its cache."""
    cache_write_tokens: int = 0
    """Prompt tokens billed for the whole search that the upstream wrote to its cache."""


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("cmpl-"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    w2s: SearchSummary | None = None


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("chatcmpl-"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    w2s: SearchSummary


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    w2s: SearchSummary | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "w2s-proxy"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
