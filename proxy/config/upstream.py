"""The black-box API: which family, which model, how prompts are rendered, limits, prices, keys.

One model per API family (proxy/upstreams/), told apart by `kind`; a config without a kind is
`openai-completions`, the paper's. Each family holds its own fields and defaults (its key
variable among them) and refuses another family's fields, naming them. `UpstreamConfig` is
the union, for annotations (`AppConfig.upstream`); `parse_upstream` validates a mapping into
its family's model.

A field that changes what the upstream answers is marked where it is declared: `Shapes[...]`,
or `ShapesWhenSet[...]` for one that counts only away from its default (it began to count after
answers were fingerprinted, and those fingerprints still hold). `answer_shaping` reads the
marks; the response cache's key (proxy.upstreams.cache) and the AlpacaEval fingerprint
(proxy.alpaca_eval.identity) are both made of it. Where a model is asked (`base_url`), with
which key, how fast or how often (limits, retries) and at what price do not change an answer.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator, ConfigDict, Discriminator, Field, SecretStr, TypeAdapter, ValidationError, model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from proxy.config.base import ConfigError, Strict


@dataclass(frozen=True)
class ShapesAnswer:
    """Marks a config field that changes what the upstream answers. `always`: it is part of every
    `answer_shaping`; otherwise only when it differs from its default."""

    always: bool = True


_T = TypeVar("_T")
Shapes = Annotated[_T, ShapesAnswer()]
ShapesWhenSet = Annotated[_T, ShapesAnswer(always=False)]


class ChatRenderConfig(Strict):
    """How chat messages become one completion prompt for a completions-only upstream.

    User turns use the upstream's `prompt_template`; these two formats hold `{content}`.
    """

    system: str = "{content}\n\n"
    assistant: str = " {content}\n\n"


class Prices(Strict):
    """US dollars per million tokens. `prompt` is the price of an uncached prompt token;
    `cached_prompt` of one read from the provider's prompt cache, `cache_write` of one written to
    it (Anthropic, OpenRouter); either unset costs `prompt`."""

    prompt: float = Field(0.0, ge=0.0)
    completion: float = Field(0.0, ge=0.0)
    cached_prompt: float | None = Field(None, ge=0.0)
    cache_write: float | None = Field(None, ge=0.0)


UpstreamKind = Literal["openai-completions", "openai-chat", "anthropic"]
ChatContinuation = Literal["continue_final_message", "prefix"]
DEFAULT_KIND: UpstreamKind = "openai-completions"


class UpstreamBase(Strict):
    """What every family has: the model and where it is, the key's variable, limits, retries, prices."""

    kind: Shapes[UpstreamKind]
    model: Shapes[str]
    base_url: str | None = None
    api_key_env: str
    """The environment variable holding the key; by default the family's usual one
    (OPENAI_API_KEY, ANTHROPIC_API_KEY), so one provider's key is never sent to another."""
    extra_body: ShapesWhenSet[dict[str, Any]] = {}
    """Fields merged into every request body under ours, e.g. DeepSeek's `{"thinking": {"type": "disabled"}}`."""
    response_cache_dir: str | None = None
    """A directory where answers to seeded requests are kept, so a rerun pays nothing twice
    (proxy.upstreams.cache); None: no cache."""
    encoding: str = "cl100k_base"
    """tiktoken encoding used to count tokens where the API's usage cannot say (several choices
    sharing one usage, text cut here) and the prompt against `context_window`."""
    context_window: Shapes[int | None] = Field(None, ge=1)
    max_concurrency: int = Field(16, ge=1)
    stagger_twins: bool = False
    """Where one prompt's K samples go as K requests (an API without `n`, such as DeepSeek's, and
    the Anthropic family), send the first alone and its K-1 twins once it has answered, so that
    they read the prompt-cache entry it wrote: Anthropic documents that an entry is readable
    only once its first response has begun, DeepSeek builds its cache best-effort. One more
    round trip per step; off, all K go at once, as the paper sends them. The samples are the
    same either way (each is seeded on its own)."""
    timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(6, ge=1)
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    prices: Prices = Prices()


class OpenAICompatibleConfig(UpstreamBase):
    """What the OpenAI-compatible families share (proxy.upstreams.openai_http)."""

    api_key_env: str = "OPENAI_API_KEY"
    seed_param: ShapesWhenSet[str | None] = "seed"
    """The request field that carries the seed (Mistral: `random_seed`); None: the API takes none."""
    hold_trailing_whitespace: ShapesWhenSet[bool] = False
    """Send the partial answer without its trailing whitespace (APIs that refuse or strip it, or
    a tokenizer that would see a lone space token); see proxy.upstreams.seam."""
    supports_n: bool | None = None
    """Does the API honour n > 1? None: learn it from the answers (proxy.upstreams.capability)."""
    cache_affinity: Literal["none", "prompt_cache_key", "x-session-affinity"] = "none"
    """How the requests of one conversation ask to reach the same prompt cache, so a search's
    re-sent prefixes are read from it: a `prompt_cache_key` body field (OpenAI, Mistral,
    Fireworks) or an `x-session-affinity` header (Fireworks), both carrying a hash of the
    conversation; `none` sends neither (DeepSeek and vLLM cache without a hint)."""


class OpenAICompletionsConfig(OpenAICompatibleConfig):
    """`openai-completions`: a raw prompt (OpenAI-compatible hosts, vLLM, SGLang)."""

    kind: Shapes[Literal["openai-completions"]] = "openai-completions"
    prompt_template: Shapes[str] = "Instruction: {instruction}\nOutput:"
    """How an instruction becomes the prompt."""
    chat: Shapes[ChatRenderConfig] = ChatRenderConfig()
    max_prompts_per_call: int = Field(16, ge=1)
    """Beams of a step sent as one request (`prompt` as a list); 1: one request per beam."""
    supports_prompt_lists: bool | None = None
    """Does the API take a list of prompts? None: learn it from the answers."""

    @model_validator(mode="after")
    def _template_has_slot(self) -> "OpenAICompletionsConfig":
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {instruction}")
        return self


class OpenAIChatConfig(OpenAICompatibleConfig):
    """`openai-chat`: messages with the partial answer as the final assistant turn, continued."""

    kind: Shapes[Literal["openai-chat"]] = "openai-chat"
    continuation: Shapes[ChatContinuation] = "continue_final_message"
    """How the final assistant turn is marked to be continued. `continue_final_message`: vLLM and
    SGLang (with `add_generation_prompt: false`); `prefix`: `"prefix": true` on the last message
    (DeepSeek's beta base URL, Mistral)."""


class AnthropicConfig(UpstreamBase):
    """`anthropic`: the Messages API through the `anthropic` SDK (no n, no seed; trailing
    whitespace of the partial answer always held back)."""

    kind: Shapes[Literal["anthropic"]] = "anthropic"
    api_key_env: str = "ANTHROPIC_API_KEY"
    prompt_caching: bool = False
    """Place `cache_control` breakpoints so a search's later requests read what its earlier ones
    wrote (proxy.upstreams.anthropic_cache); Anthropic caches nothing without them."""
    cache_min_tokens: int = Field(1024, ge=0)
    """The model's minimum cacheable prefix (Sonnet 4.5: 1,024 tokens; Opus 4.5 and Haiku 4.5:
    4,096): no breakpoint is placed on a shorter prefix, where it would cache nothing."""
    cache_ttl: Literal["5m", "1h"] = "5m"
    """How long a written prefix lives (a 1-hour write costs 2x the input price, 5 minutes 1.25x)."""


FAMILIES: dict[str, type[UpstreamBase]] = {
    "openai-completions": OpenAICompletionsConfig, "openai-chat": OpenAIChatConfig, "anthropic": AnthropicConfig,
}


def _foreign_fields(data: Mapping[str, Any], family: type[UpstreamBase]) -> list[InitErrorDetails]:
    """A complaint for each key that belongs to other families only, naming them."""
    kind = family.model_fields["kind"].default
    errors: list[InitErrorDetails] = []
    for key in data:
        if key in family.model_fields:
            continue
        owners = [k for k, f in FAMILIES.items() if key in f.model_fields]
        if owners:
            problem = PydanticCustomError(
                "foreign_field", "a field of {owners} upstreams, not of {kind} (set `kind`, or remove it)",
                {"owners": " and ".join(owners), "kind": kind})
            errors.append(InitErrorDetails(type=problem, loc=(key,), input=data[key]))
    return errors


def _family(data: Any) -> Any:
    """A mapping validated as its kind's family (default openai-completions); anything else is
    left to the union, which says what it expected."""
    if not isinstance(data, Mapping):
        return data
    kind = data.get("kind", DEFAULT_KIND)
    family = FAMILIES.get(kind) if isinstance(kind, str) else None
    if family is None:  # the message a Literal gives
        *first, last = FAMILIES
        expected = f"{', '.join(repr(k) for k in first)} or {last!r}"
        raise ValidationError.from_exception_data("UpstreamConfig", [InitErrorDetails(
            type="literal_error", loc=("kind",), input=kind, ctx={"expected": expected})])
    foreign = _foreign_fields(data, family)
    if foreign:
        raise ValidationError.from_exception_data(family.__name__, foreign)
    return family.model_validate(data)


UpstreamConfig = Annotated[
    Union[OpenAICompletionsConfig, OpenAIChatConfig, AnthropicConfig],
    BeforeValidator(_family),
    Discriminator("kind"),
]
"""One black-box API: the family `kind` names (proxy/upstreams/)."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(UpstreamConfig, config=ConfigDict(title="upstream"))


def parse_upstream(data: Any) -> OpenAICompletionsConfig | OpenAIChatConfig | AnthropicConfig:
    """A mapping (or a family's model) as its family's model; pydantic's ValidationError naming
    the field when it is not one."""
    return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]


def answer_shaping(cfg: UpstreamBase) -> dict[str, Any]:
    """The fields that change what `cfg`'s upstream answers, as JSON-ready values: those marked
    `Shapes`, and those marked `ShapesWhenSet` that differ from their default."""
    names = set()
    for name, info in type(cfg).model_fields.items():
        mark = next((m for m in info.metadata if isinstance(m, ShapesAnswer)), None)
        if mark is not None and (mark.always or getattr(cfg, name) != info.get_default(call_default_factory=True)):
            names.add(name)
    return cfg.model_dump(mode="json", include=names)


def _on_this_machine(base_url: str | None) -> bool:
    host = urlsplit(base_url).hostname if base_url else None
    return host in ("localhost", "::1") or (host is not None and host.startswith("127."))


def upstream_api_key(cfg: UpstreamBase) -> SecretStr:
    """The upstream key from the environment. A server on this machine (vLLM without --api-key)
    accepts any value; a hosted API without its key is refused here, before any request."""
    value = os.environ.get(cfg.api_key_env)
    if not value:
        if not _on_this_machine(cfg.base_url):
            raise ConfigError(f"upstream: set {cfg.api_key_env} (the key of {cfg.base_url or 'the API'}; "
                              "only a server on this machine needs none)")
        value = "no-key"
    return SecretStr(value)
