"""What our model servers accept on POST /v1/completions: the local model server (`w2s
serve-local`) and the test servers that stand in for an upstream.

OpenAI's rules for the fields that change the output (types strict, ranges checked, a 400 naming
the field), and fields that do not change it (logprobs, echo, user, penalties ...) accepted and
ignored, as an inference server does. `stream: true` is refused: these servers answer whole
responses. (How we read an upstream's answers lives with the upstreams: proxy.upstreams.reading.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.types import MAX_STOP

MAX_N = 128
"""Choices one request may ask for (OpenAI's limit): bounds the work of one request."""
MAX_TOKENS_LIMIT = 65536
MAX_PROMPTS = 64


@dataclass(frozen=True)
class CompletionParams:
    """One prompt of a completions request, with everything that decides its output."""

    model: str
    prompt: str
    n: int = 1
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


class ModelCompletionRequest(BaseModel):
    """POST /v1/completions as our model servers accept it. `null` means the default."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    model: str = Field(min_length=1)
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    n: int | None = Field(None, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool | None = None

    @field_validator("stream")
    @classmethod
    def _whole_answers(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("stream=true is not supported by this server")
        return v

    def params(self) -> list[CompletionParams]:
        """One CompletionParams per prompt; empty stop strings are dropped, as the API does."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [CompletionParams(
            model=self.model, prompt=p, n=1 if self.n is None else self.n,
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            stop=tuple(s for s in stops if s),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed) for p in prompts]
