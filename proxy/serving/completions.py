"""POST /v1/completions: the prompt goes to the upstream as it is, and the scorer conditions on
the same text; the answer is the search's text, unchanged."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from proxy.serving.endpoint import Endpoint, FinishReason
from proxy.protocol.requests import CompletionRequest
from proxy.protocol.responses import CompletionChoice, CompletionResponse, SearchSummary, UsageInfo
from proxy.types import Conversation


class CompletionsEndpoint(Endpoint[CompletionRequest]):
    path: ClassVar[str] = "/v1/completions"
    request_type = CompletionRequest
    id_prefix: ClassVar[str] = "cmpl-"
    prompt_field: ClassVar[str] = "prompt"

    def max_tokens(self, req: CompletionRequest) -> int | None:
        return req.max_tokens

    def conversation(self, req: CompletionRequest) -> Conversation:
        return Conversation.completion(req.prompt_text)

    def answer(self, req: CompletionRequest, text: str, reason: FinishReason, usage: UsageInfo,
               summary: SearchSummary) -> BaseModel:
        return CompletionResponse(model=req.model, usage=usage, w2s=summary,
                                  choices=[CompletionChoice(text=text, finish_reason=reason)])

    def chunk(self, rid: str, created: int, req: CompletionRequest, text: str | None,
              reason: FinishReason | None = None, *, usage: UsageInfo | None = None,
              summary: SearchSummary | None = None, empty: bool = False) -> BaseModel:
        choices = [] if empty else [CompletionChoice(text=text or "", finish_reason=reason)]
        return CompletionResponse(id=rid, created=created, model=req.model, choices=choices, usage=usage, w2s=summary)
