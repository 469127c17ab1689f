"""What a client may send the guidance server: request bodies, nothing else.

Kept apart from the serving code (as vLLM's entrypoint does) so that what a client may send is
readable in one place. Requests are parsed strictly from JSON: a string where a number belongs,
an unknown field, or a feature this server cannot honour (n > 1, logprobs, echo, penalties)
is a 400 naming the field, never silently ignored. The `w2s` body field (sent by the openai
SDK through `extra_body`) picks and tunes the guided search per request.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from proxy.config.search import SETTINGS, Setting, setting_fields

from proxy.types import MAX_STOP


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def w2s_options_model(settings: Iterable[Setting] = SETTINGS) -> type[_Request]:
    """The `w2s` body field: a mode by name and/or any search setting a request may override
    (those the OpenAI fields do not carry), each optional. Built from the settings table, so a
    new per-request setting is a new field here without an edit."""
    fields = setting_fields([s for s in settings if s.per_request and s.openai_field is None], optional=True)
    return create_model("W2SOptions", __base__=_Request, __doc__=_W2S_DOC,
                        mode=(str | None, Field(None, description="a mode of the server by name")), **fields)


_W2S_DOC = """Per-request guidance: a mode by name and/or search settings.

`l: null` sent explicitly means an unbounded chunk (best-of-N style); left out, the mode's own
L applies."""

W2SOptions = w2s_options_model()


class StreamOptions(_Request):
    include_usage: bool = False


def _zero(name: str, value: float | None) -> None:
    if value not in (None, 0, 0.0):
        raise ValueError(f"{name} is not supported by this server (the search samples the upstream itself)")


class SamplingRequest(_Request):
    """Fields common to completions and chat completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    w2s: W2SOptions | None = None  # type: ignore[valid-type]

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported (the search returns one answer; use w2s.k for more samples)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None, info: Any) -> float | None:
        _zero(info.field_name, v)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("echo=true is not supported by this server")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("logprobs are not available: the upstream's tokens are resampled by the search")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of is not supported; ask for a mode such as `+bon8` instead")
        return v

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_message(self) -> dict[str, str]:
        """The (role, content) pair the prompt renderers and the scorer expect."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not available: the upstream's tokens are resampled by the search")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("top_logprobs are not available")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
