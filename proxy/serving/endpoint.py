"""What one generation route adds to the shared core: how its request becomes a prompt, and how
its answers and stream chunks look.

/v1/completions and /v1/chat/completions run the same search under the same limits and errors
(proxy.serving.generation) and stream the same way (proxy.serving.streaming); they differ only
in the few methods below. A new generation route is one more subclass, registered in
proxy.serving.app; nothing else needs to know which route it is.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel

from proxy.search import SearchResult
from proxy.protocol.requests import SamplingRequest
from proxy.protocol.responses import PromptTokensDetails, SearchSummary, UsageInfo
from proxy.serving.errors import ApiError
from proxy.types import Conversation

Req = TypeVar("Req", bound=SamplingRequest)
FinishReason = Literal["stop", "length"]


class Endpoint(ABC, Generic[Req]):
    path: ClassVar[str]
    """The route, e.g. "/v1/completions"."""
    request_type: type[Req]
    """The wire model the body is parsed into (strictly: a bad field is a 400)."""
    id_prefix: ClassVar[str]
    """Of response ids, with OpenAI's separator: "cmpl-", "chatcmpl-", "resp_"."""
    prompt_field: ClassVar[str]
    """The request field that holds the prompt: "prompt", "messages"."""
    renames: ClassVar[dict[str, str]] = {}
    """The route's names for the chat route's fields, where they differ (the Responses API's
    `input`, `max_output_tokens`): an error names the field the client sent (`renamed`)."""
    forwards: ClassVar[bool] = False
    """In plain mode, a body using what only the upstream can honour goes to a chat upstream as
    it is (proxy.serving.passthrough): the chat route's bodies are already in its format."""

    @abstractmethod
    def max_tokens(self, req: Req) -> int | None:
        """The client's token limit, under whichever field name this route uses."""

    @abstractmethod
    def conversation(self, req: Req) -> Conversation:
        """What the answer responds to; ApiError if it cannot be built."""

    def renamed(self, error: ApiError) -> ApiError:
        """`error` naming this route's fields (`renames`), in its param and its message."""
        if not self.renames:
            return error
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, self.renames)) + r")\b")
        param = None if error.param is None else pattern.sub(lambda m: self.renames[m.group(1)], error.param)
        return ApiError(error.status, pattern.sub(lambda m: self.renames[m.group(1)], str(error)), param=param,
                        code=error.code, type_=error.body.error.type, headers=error.headers)

    def display(self, text: str) -> str:
        """The answer so far as the client sees it; must keep prefixes as prefixes (streaming)."""
        return text

    @abstractmethod
    def answer(self, req: Req, text: str, reason: FinishReason, usage: UsageInfo,
               summary: SearchSummary) -> BaseModel:
        """The whole response body of a request that did not stream."""

    def opening(self, rid: str, created: int, req: Req) -> list[BaseModel]:
        """Chunks sent before the search's first step (none by default)."""
        return []

    @abstractmethod
    def chunk(self, rid: str, created: int, req: Req, text: str | None, reason: FinishReason | None = None, *,
              usage: UsageInfo | None = None, summary: SearchSummary | None = None,
              empty: bool = False) -> BaseModel:
        """One stream chunk: a text delta, the final one (`reason`, `summary`; `text` None), or,
        with `empty`, one with no choices that carries the usage."""

    def closing(self, rid: str, created: int, req: Req, text: str, reason: FinishReason, usage: UsageInfo,
                summary: SearchSummary) -> list[BaseModel]:
        """The events after the answer's last delta (`text`: the whole answer as sent): by default
        the final chunk, then the usage chunk where the client asked for it."""
        events = [self.chunk(rid, created, req, None, reason, summary=summary)]
        if req.include_usage:
            events.append(self.chunk(rid, created, req, None, usage=usage, empty=True))
        return events

    def framing(self) -> Callable[[BaseModel], bytes] | None:
        """How one stream writes each event, made anew per stream (so it may number them); None:
        `data: <json>`, as OpenAI's chat and completions streams do."""
        return None

    stream_end: ClassVar[bytes] = b"data: [DONE]\n\n"
    """What ends a stream after its last event."""


def usage_info(result: SearchResult) -> UsageInfo:
    """Every token billed upstream for the whole search, not only the answer's; of the prompt
    tokens, those the upstream's cache served (and wrote) in OpenAI's `prompt_tokens_details`."""
    u = result.usage
    return UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                     total_tokens=u.total_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens,
                                                               cache_write_tokens=u.cache_write_tokens))


def finish_reason(result: SearchResult) -> FinishReason:
    return "stop" if result.finished else "length"
