"""What a client may send the guidance server: request bodies, nothing else.

Kept apart from the serving code (as vLLM's entrypoint does) so that what a client may send is
readable in one place. Requests are parsed strictly from JSON: a string where a number belongs,
an unknown field, or a feature this server cannot honour (n > 1, logprobs, echo, penalties,
tools, structured output) is a 400 naming the field, never silently ignored. The fields that
cannot change the answer (`store`, `metadata`, `service_tier`, ...) are accepted and ignored,
whatever their value: they are declared once, in `IGNORED_FIELDS`, and the manual's table
(docs/serving.md) is checked against it, as is its table of `CHAT_REFUSED`. The `w2s` body
field (sent by the openai SDK through `extra_body`) picks and tunes the guided search per request.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from proxy.config.search import SETTINGS, Setting, setting_fields

from proxy.types import MAX_STOP


IGNORED_FIELDS: dict[str, str] = {
    "user": "an end-user id for the provider's abuse monitoring; not passed on",
    "safety_identifier": "the same, under OpenAI's newer name; not passed on",
    "store": "asks OpenAI to store the completion; this server stores none",
    "metadata": "tags for a stored completion; nothing is stored",
    "service_tier": "the upstream's processing tier is the operator's (upstream config)",
    "prompt_cache_key": "the server keys the upstream's prompt cache per conversation itself, "
                        "where `upstream.cache_affinity` says",
    "prompt_cache_retention": "how long the upstream keeps its cache is the upstream's",
    "parallel_tool_calls": "matters only with tools, which the search refuses (a forwarded request keeps it)",
    "prediction": "a latency hint (predicted output); the answer does not depend on it",
    "reasoning_effort": "the upstream's reasoning is the operator's choice (`upstream.extra_body`); "
                        "reasoning is never part of the answer",
    "verbosity": "a style hint; the operator sets upstream fields (`upstream.extra_body`)",
    "stream_options.include_obfuscation": "padding in stream chunks; none is added",
}
"""Request fields accepted on both routes and ignored, whatever their value, with why that
changes nothing for the answer; `a.b` is field `b` of the object in field `a`."""


@dataclass(frozen=True)
class Refusal:
    """A chat field the search cannot honour: accepted only at a value that asks for nothing."""

    harmless: tuple[Any, ...]
    why: str


CHAT_REFUSED: dict[str, Refusal] = {
    "tools": Refusal((None, []), "tool calls are not supported (the search writes text)"),
    "tool_choice": Refusal((None, "none", "auto"), "tool calls are not supported (the search writes text)"),
    "functions": Refusal((None, []), "function calls are not supported (the search writes text)"),
    "function_call": Refusal((None, "none", "auto"), "function calls are not supported (the search writes text)"),
    "response_format": Refusal((None, {"type": "text"}),
                               "structured output is not supported (the search cannot constrain the text)"),
    "modalities": Refusal((None, ["text"]), "only text output is supported"),
    "audio": Refusal((None,), "audio output is not supported"),
    "web_search_options": Refusal((None,), "web search is not supported"),
}
"""/v1/chat/completions fields the search cannot honour, a 400 naming the field unless sent at
one of its harmless values (null, no tools, a text response)."""


def upstream_features(body: Any) -> list[str]:
    """The fields of a chat body (parsed JSON) that only the upstream can honour, named as a 400
    names them: what the search refuses (`CHAT_REFUSED` at other values, logprobs, n > 1,
    penalties, a logit bias) and messages it cannot read (tool results, tool calls, parts that
    are not text). In plain mode the server forwards such a request to a chat upstream as it is
    (proxy.serving.passthrough); anything that is not a JSON object has none (the strict parse
    then names what is wrong)."""
    if not isinstance(body, dict):
        return []
    found = [name for name, refusal in CHAT_REFUSED.items() if body.get(name) not in refusal.harmless]
    found += [name for name, harmless in _SEARCH_REFUSED.items() if body.get(name) not in harmless]
    if body.get("logit_bias"):
        found.append("logit_bias")
    messages = body.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(m, dict):
            continue
        if m.get("role") in ("tool", "function"):
            found.append(f"messages.{i}.role")
        if m.get("tool_calls") or m.get("function_call"):
            found.append(f"messages.{i}.tool_calls")
        content = m.get("content")
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            found.append(f"messages.{i}.content")
    return found


_SEARCH_REFUSED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None,), "n": (None, 1),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0)}
"""Chat fields the search refuses (validators below) unless at these values: an upstream honours them."""


def ignored_under(prefix: str, fields: Mapping[str, str] = IGNORED_FIELDS) -> frozenset[str]:
    """The names of the ignored fields of the object at `prefix` ("" for the request body)."""
    return frozenset(name.removeprefix(f"{prefix}.") for name in fields
                     if (name.startswith(f"{prefix}.") if prefix else "." not in name))


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    ignored: ClassVar[frozenset[str]] = frozenset()
    """Fields dropped before validation (IGNORED_FIELDS): accepted, whatever their value."""

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if cls.ignored and isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in cls.ignored}
        return data


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
    ignored: ClassVar[frozenset[str]] = ignored_under("stream_options")
    include_usage: bool = False


def _zero(name: str, value: float | None) -> None:
    if value not in (None, 0, 0.0):
        raise ValueError(f"{name} is not supported by this server (the search samples the upstream itself)")


class SamplingRequest(_Request):
    """Fields common to completions and chat completions."""

    ignored: ClassVar[frozenset[str]] = ignored_under("")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
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


def refusing(base: type[SamplingRequest], refused: Mapping[str, Refusal] = CHAT_REFUSED) -> type[SamplingRequest]:
    """`base` with a field for each of `refused`, any JSON value, a 400 unless a harmless one."""
    def refuse(cls: type, value: Any, info: ValidationInfo) -> Any:
        if value not in refused[info.field_name or ""].harmless:
            raise ValueError(refused[info.field_name or ""].why)
        return value
    return create_model(f"{base.__name__}Refusing", __base__=base, __module__=__name__,
                        __validators__={"_refuse": field_validator(*refused)(refuse)},  # type: ignore[dict-item]
                        **{name: (Any, None) for name in refused})


class ChatCompletionRequest(refusing(SamplingRequest)):  # type: ignore[misc]
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
