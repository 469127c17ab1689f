"""POST /v1/chat/completions over a completions upstream: the messages are rendered with the
upstream's template (proxy.prompts.render_chat) while the scorer gets the messages themselves
and renders them with its own models' templates. The answer drops the completion's leading
whitespace (`Output: The...` gives "The..."), also while streaming."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from proxy.config import UpstreamConfig
from proxy.prompts import PromptError, render_chat
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
from scorers.base import ChatMessage, ScorerPrompt


class ChatEndpoint(Endpoint[ChatCompletionRequest]):
    path: ClassVar[str] = "/v1/chat/completions"
    request_type = ChatCompletionRequest
    id_prefix: ClassVar[str] = "chatcmpl"

    def __init__(self, upstream: UpstreamConfig) -> None:
        self.upstream = upstream

    def max_tokens(self, req: ChatCompletionRequest) -> int | None:
        return req.token_limit

    def prompts(self, req: ChatCompletionRequest) -> tuple[str, ScorerPrompt]:
        messages: list[ChatMessage] = [m.as_message() for m in req.messages]  # type: ignore[misc]
        try:
            return render_chat(messages, self.upstream), messages
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
