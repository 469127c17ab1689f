"""POST /v1/responses: OpenAI's Responses API over the same search as /v1/chat/completions.

The request stands for chat messages (proxy.protocol.responses_api), so the conversation, the
answer's text (leading whitespace dropped) and every limit and error are the chat route's; only
the bodies differ. A stream is the Responses API's typed events, each with its `event:` line and
its `sequence_number`: response.created, response.in_progress, response.output_item.added,
response.content_part.added, then one response.output_text.delta per settled piece of text, then
response.output_text.done, response.content_part.done, response.output_item.done and
response.completed (response.incomplete where the answer was cut at its token limit), which
carries the usage and the `w2s` summary. No `[DONE]` follows, as OpenAI sends none.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import ClassVar

from pydantic import BaseModel

from proxy.protocol.responses import SearchSummary, UsageInfo, new_id, now
from proxy.protocol.responses_api import (
    IncompleteDetails,
    ItemEvent,
    LifecycleEvent,
    OutputMessage,
    OutputText,
    PartEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from proxy.serving.chat import ChatEndpoint
from proxy.serving.endpoint import FinishReason
from proxy.serving.errors import ApiError
from proxy.types import Conversation


def item_id(rid: str) -> str:
    """The id of the one output message of response `rid`."""
    return "msg_" + rid.removeprefix("resp_")


def response_usage(usage: UsageInfo) -> ResponseUsage:
    """The chat routes' usage under the Responses API's names; no reasoning tokens are billed."""
    assert usage.prompt_tokens_details is not None
    return ResponseUsage(input_tokens=usage.prompt_tokens, input_tokens_details=usage.prompt_tokens_details,
                         output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens)


def response_object(rid: str, created: int, req: ResponsesRequest, output: list[OutputMessage], *,
                    reason: FinishReason | None = None, usage: UsageInfo | None = None,
                    summary: SearchSummary | None = None) -> ResponseObject:
    """The response `rid`: in progress without a `reason`, else completed or (cut at its token
    limit) incomplete."""
    status = "in_progress" if reason is None else "completed" if reason == "stop" else "incomplete"
    return ResponseObject(id=rid, created_at=created, status=status, model=req.model, output=output,
                          usage=None if usage is None else response_usage(usage),
                          incomplete_details=IncompleteDetails() if status == "incomplete" else None,
                          instructions=req.instructions, max_output_tokens=req.max_output_tokens,
                          temperature=req.temperature, top_p=req.top_p, w2s=summary)


def message(rid: str, text: str, reason: FinishReason | None) -> OutputMessage:
    status = "in_progress" if reason is None else "completed" if reason == "stop" else "incomplete"
    return OutputMessage(id=item_id(rid), status=status, content=[OutputText(text=text)] if reason else [])


def numbered() -> Callable[[BaseModel], bytes]:
    """A stream's framing: each event with its `event:` line, numbered from 0 in the order sent."""
    counter = itertools.count()

    def frame(event: BaseModel) -> bytes:
        assert isinstance(event, StreamEvent)
        numbered = event.model_copy(update={"sequence_number": next(counter)})
        return f"event: {event.type}\ndata: {numbered.model_dump_json()}\n\n".encode()
    return frame


class ResponsesEndpoint(ChatEndpoint):
    """The chat route's conversation and text, in the Responses API's bodies."""

    path: ClassVar[str] = "/v1/responses"
    request_type = ResponsesRequest  # type: ignore[assignment]
    id_prefix: ClassVar[str] = "resp_"
    prompt_field: ClassVar[str] = "input"
    stream_end: ClassVar[bytes] = b""

    renames: ClassVar[dict[str, str]] = {"messages": "input", "max_tokens": "max_output_tokens"}

    def conversation(self, req: ResponsesRequest) -> Conversation:  # type: ignore[override]
        """The chat route's, its complaints about `messages` put in terms of `input`."""
        try:
            return super().conversation(req)  # type: ignore[arg-type]
        except ApiError as e:
            error = self.renamed(e)
            raise (error if error.param is not None else
                   ApiError(e.status, str(error), param="input", code=e.code)) from None

    def answer(self, req: ResponsesRequest, text: str, reason: FinishReason,  # type: ignore[override]
               usage: UsageInfo, summary: SearchSummary) -> BaseModel:
        rid = new_id(self.id_prefix)
        return response_object(rid, now(), req, [message(rid, self.display(text), reason)], reason=reason,
                               usage=usage, summary=summary)

    def opening(self, rid: str, created: int, req: ResponsesRequest) -> list[BaseModel]:  # type: ignore[override]
        started = response_object(rid, created, req, [])
        return [LifecycleEvent(type="response.created", response=started),
                LifecycleEvent(type="response.in_progress", response=started),
                ItemEvent(type="response.output_item.added", item=message(rid, "", None)),
                PartEvent(type="response.content_part.added", item_id=item_id(rid), part=OutputText(text=""))]

    def chunk(self, rid: str, created: int, req: ResponsesRequest, text: str | None,  # type: ignore[override]
              reason: FinishReason | None = None, *, usage: UsageInfo | None = None,
              summary: SearchSummary | None = None, empty: bool = False) -> BaseModel:
        """A text delta (the rest of the stream is `closing`'s)."""
        return TextDeltaEvent(item_id=item_id(rid), delta=text or "")

    def closing(self, rid: str, created: int, req: ResponsesRequest, text: str,  # type: ignore[override]
                reason: FinishReason, usage: UsageInfo, summary: SearchSummary) -> list[BaseModel]:
        done = message(rid, text, reason)
        final = response_object(rid, created, req, [done], reason=reason, usage=usage, summary=summary)
        return [TextDoneEvent(item_id=done.id, text=text),
                PartEvent(type="response.content_part.done", item_id=done.id, part=done.content[0]),
                ItemEvent(type="response.output_item.done", item=done),
                LifecycleEvent(type=f"response.{final.status}", response=final)]

    def framing(self) -> Callable[[BaseModel], bytes]:
        return numbered()
