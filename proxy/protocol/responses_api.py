"""OpenAI's Responses API (POST /v1/responses): what a client may send, and what we write back.

A Responses request is a chat request under other names: `input` (a string: one user turn; or
messages, their content a string or `input_text` / `output_text` parts) with `instructions` as
a system message first, `max_output_tokens` for `max_tokens`. So it becomes the same messages
(`ResponsesRequest.messages`) and the same search as a chat request would. Parsed as strictly:
the fields that cannot change the answer are accepted and ignored (the chat routes' list,
`IGNORED_FIELDS`, and a few of the Responses API's own, `RESPONSES_IGNORED`); those asking for
what the search cannot do (tools, stored conversation state, background runs, structured
output, logprobs) are a 400 naming the field unless sent at a value that asks for nothing.
`seed` is accepted as an extension (the chat routes' field), as is `w2s`.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from proxy.protocol.requests import IGNORED_FIELDS, ChatMessageIn, Refusal, W2SOptions, _Request, ignored_under
from proxy.protocol.responses import PromptTokensDetails, SearchSummary, _Response

RESPONSES_IGNORED: dict[str, str] = {
    "reasoning": "the upstream's reasoning is the operator's choice (`upstream.extra_body`); "
                 "reasoning is never part of the answer",
    "truncation": "a prompt too long for the scorer is a 400 either way",
    "max_tool_calls": "matters only with tools, which are refused",
    "text.verbosity": "a style hint; the operator sets upstream fields (`upstream.extra_body`)",
}
"""Responses API fields accepted and ignored besides the chat routes' IGNORED_FIELDS."""

_NO_TOOLS = "tool calls are not supported (the search writes text)"
RESPONSES_REFUSED: dict[str, Refusal] = {
    "tools": Refusal((None, []), _NO_TOOLS),
    "tool_choice": Refusal((None, "none", "auto"), _NO_TOOLS),
    "previous_response_id": Refusal((None,), "this server stores no responses: send the whole conversation "
                                              "as `input`"),
    "conversation": Refusal((None,), "this server stores no conversations: send the whole conversation as `input`"),
    "background": Refusal((None, False), "background responses are not supported"),
    "prompt": Refusal((None,), "stored prompt templates are not supported: send the prompt as `input`"),
    "top_logprobs": Refusal((None, 0), "logprobs are not available: the upstream's tokens are resampled "
                                       "by the search"),
}
"""Fields the search cannot honour: a 400 naming the field unless at one of its harmless values."""


class InputPart(_Request):
    """A text part of an input message; `output_text` is how an earlier answer comes back."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(_Request):
    """One message of `input`: an EasyInputMessage, or an output message sent back."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def as_chat(self) -> ChatMessageIn:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessageIn(role=self.role, content=content)


class TextOptions(_Request):
    """The `text` field: only plain text (structured output would need a constrained search)."""

    ignored: ClassVar[frozenset[str]] = ignored_under("text", RESPONSES_IGNORED)
    format: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def _plain(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v not in (None, {"type": "text"}):
            raise ValueError("structured output is not supported (the search cannot constrain the text)")
        return v


class ResponsesStreamOptions(_Request):
    ignored: ClassVar[frozenset[str]] = ignored_under("stream_options")


class ResponsesRequest(_Request):
    """POST /v1/responses."""

    ignored: ClassVar[frozenset[str]] = ignored_under("") | ignored_under("", RESPONSES_IGNORED)
    model: str = Field(min_length=1)
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    text: TextOptions | None = None
    include: list[str] | None = None
    w2s: W2SOptions | None = None  # type: ignore[valid-type]
    tools: Any = None
    tool_choice: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    prompt: Any = None
    top_logprobs: Any = None

    @field_validator(*RESPONSES_REFUSED)
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        refusal = RESPONSES_REFUSED[info.field_name or ""]
        if value not in refusal.harmless:
            raise ValueError(refusal.why)
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _text_messages_only(cls, v: Any) -> Any:
        """Items other than messages (function calls and their outputs, reasoning, ...) and parts
        other than text named plainly, rather than as every way the item fails to be a message."""
        for i, item in enumerate(v if isinstance(v, list) else []):
            kind = item.get("type", "message") if isinstance(item, dict) else "message"
            if kind != "message":
                raise ValueError(f"item {i} is a {kind!r}: only messages are supported (no tools, no reasoning items)")
            parts = item.get("content") if isinstance(item, dict) else None
            for j, part in enumerate(parts if isinstance(parts, list) else []):
                if isinstance(part, dict) and part.get("type") not in ("input_text", "output_text"):
                    raise ValueError(f"item {i}, part {j} is a {part.get('type')!r}: only text parts are supported")
        return v

    @field_validator("include")
    @classmethod
    def _no_logprobs(cls, v: list[str] | None) -> list[str] | None:
        if v and any("logprobs" in item for item in v):
            raise ValueError("logprobs are not available: the upstream's tokens are resampled by the search")
        return v

    @property
    def messages(self) -> list[ChatMessageIn]:
        """The chat messages this request stands for: `instructions` first, as a system message."""
        turns = [ChatMessageIn(role="user", content=self.input)] if isinstance(self.input, str) \
            else [m.as_chat() for m in self.input]
        return ([ChatMessageIn(role="system", content=self.instructions)] if self.instructions else []) + turns

    @property
    def token_limit(self) -> int | None:
        return self.max_output_tokens

    @property
    def stop_list(self) -> list[str]:
        return []

    @property
    def include_usage(self) -> bool:
        return False


# ------------------------------------------------------------------ what we write back


class OutputText(_Response):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(_Response):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputTokensDetails(_Response):
    reasoning_tokens: int = 0


class ResponseUsage(_Response):
    """Every token billed upstream for the whole search, as the chat routes' `usage` counts them."""

    input_tokens: int
    input_tokens_details: PromptTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(_Response):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(_Response):
    """A response, whole (`status` completed or incomplete) or as a stream's lifecycle events carry it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[OutputMessage]
    usage: ResponseUsage | None = None
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = False
    tool_choice: Literal["none", "auto"] = "none"
    tools: list[Any] = []
    text: dict[str, Any] = {"format": {"type": "text"}}
    store: bool = False
    w2s: SearchSummary | None = None


class StreamEvent(_Response):
    """One event of a stream; the stream numbers them (`sequence_number`) as it writes them."""

    model_config = ConfigDict(extra="forbid")
    type: str
    sequence_number: int = 0


class LifecycleEvent(StreamEvent):
    response: ResponseObject


class ItemEvent(StreamEvent):
    output_index: int = 0
    item: OutputMessage


class PartEvent(StreamEvent):
    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: OutputText


class _TextEvent(StreamEvent):
    """Where an output_text event's text belongs (the one message's one text part)."""

    item_id: str
    output_index: int = 0
    content_index: int = 0
    logprobs: list[Any] = []


class TextDeltaEvent(_TextEvent):
    type: str = "response.output_text.delta"
    delta: str


class TextDoneEvent(_TextEvent):
    type: str = "response.output_text.done"
    text: str
