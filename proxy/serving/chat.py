"""POST /v1/chat/completions: the messages become the conversation the search answers; each
upstream renders it its own way (a completions upstream through its template, a chat upstream
as messages), and the scorer renders it with its own models' templates. The answer drops a
completion's leading whitespace (`Output: The...` gives "The..."), also while streaming."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from proxy.prompts import PromptError, chat_conversation
from proxy.serving.endpoint import Endpoint, FinishReason
from proxy.serving.errors import ApiError
from proxy.protocol.requests import ChatCompletionRequest
from proxy.protocol.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    SearchSummary,
    UsageInfo,
)
from proxy.types import ChatMessage, Conversation


class ChatEndpoint(Endpoint[ChatCompletionRequest]):
    path: ClassVar[str] = "/v1/chat/completions"
    request_type = ChatCompletionRequest
    id_prefix: ClassVar[str] = "chatcmpl-"
    prompt_field: ClassVar[str] = "messages"
    forwards: ClassVar[bool] = True

    def max_tokens(self, req: ChatCompletionRequest) -> int | None:
        return req.token_limit

    def conversation(self, req: ChatCompletionRequest) -> Conversation:
        messages: list[ChatMessage] = [m.as_message() for m in req.messages]  # type: ignore[misc]
        try:
            return chat_conversation(messages)
        except PromptError as e:
            raise ApiError(400, str(e), param=e.param, code="invalid_value") from None

    def display(self, text: str) -> str:
        return text.lstrip()

    def answer(self, req: ChatCompletionRequest, text: str, reason: FinishReason, usage: UsageInfo,
               summary: SearchSummary) -> BaseModel:
        return ChatCompletionResponse(model=req.model, usage=usage, w2s=summary, choices=[
            ChatChoice(message=ChatMessageOut(content=self.display(text)), finish_reason=reason)])

    def opening(self, rid: str, created: int, req: ChatCompletionRequest) -> list[BaseModel]:
        """OpenAI's first chunk: the role, with empty content."""
        return [ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[
            ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def chunk(self, rid: str, created: int, req: ChatCompletionRequest, text: str | None,
              reason: FinishReason | None = None, *, usage: UsageInfo | None = None,
              summary: SearchSummary | None = None, empty: bool = False) -> BaseModel:
        choices = [] if empty else [ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=reason)]
        return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices, usage=usage, w2s=summary)
