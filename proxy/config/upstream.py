"""The black-box API: which family, which model, how prompts are rendered, limits, prices, keys."""
from __future__ import annotations

import os
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator

from proxy.config.base import ConfigError, Strict


class ChatRenderConfig(Strict):
    """How chat messages become one completion prompt for a completions-only upstream.

    User turns use the upstream's `prompt_template`; these two formats hold `{content}`.
    """

    system: str = "{content}\n\n"
    assistant: str = " {content}\n\n"


class Prices(Strict):
    """US dollars per million tokens."""

    prompt: float = Field(0.0, ge=0.0)
    completion: float = Field(0.0, ge=0.0)


UpstreamKind = Literal["openai-completions", "openai-chat", "anthropic"]
ChatContinuation = Literal["continue_final_message", "prefix"]


class UpstreamConfig(Strict):
    """One black-box API. `kind` picks the family (proxy/upstreams/): `openai-completions` (a raw
    prompt: OpenAI-compatible hosts, vLLM, SGLang), `openai-chat` (messages with the partial
    answer as the final assistant turn, in the dialect `continuation` names) or `anthropic`
    (the Messages API through the `anthropic` SDK)."""

    kind: UpstreamKind = "openai-completions"
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the key; by default the family's usual one
    (OPENAI_API_KEY, ANTHROPIC_API_KEY), so one provider's key is never sent to another."""
    prompt_template: str = "Instruction: {instruction}\nOutput:"
    """Completions only: how an instruction becomes the prompt (chat families send messages)."""
    chat: ChatRenderConfig = ChatRenderConfig()
    continuation: ChatContinuation = "continue_final_message"
    """openai-chat only: how the final assistant turn is marked to be continued.
    `continue_final_message`: vLLM and SGLang (with `add_generation_prompt: false`);
    `prefix`: `"prefix": true` on the last message (DeepSeek's beta base URL, Mistral)."""
    seed_param: str | None = "seed"
    """The request field that carries the seed (Mistral: `random_seed`); None: the API takes none."""
    extra_body: dict[str, Any] = {}
    """Fields merged into every request body, e.g. DeepSeek's `{"thinking": {"type": "disabled"}}`."""
    response_cache_dir: str | None = None
    """A directory where answers to seeded requests are kept, so a rerun pays nothing twice
    (proxy.upstreams.cache); None: no cache."""
    hold_trailing_whitespace: bool = False
    """Send the partial answer without its trailing whitespace (APIs that refuse or strip it in a
    prefilled turn: Anthropic); see proxy.upstreams.seam."""
    encoding: str = "cl100k_base"
    """tiktoken encoding used to count tokens of stop-finished continuations when n>1."""
    context_window: int | None = Field(None, ge=1)
    max_concurrency: int = Field(16, ge=1)
    max_prompts_per_call: int = Field(16, ge=1)
    """Beams of a step sent as one request (`prompt` as a list); 1: one request per beam."""
    supports_n: bool | None = None
    """Does the API honour n > 1? None: learn it from the answers (proxy.upstreams.capability)."""
    supports_prompt_lists: bool | None = None
    """Does a completions API take a list of prompts? None: learn it from the answers."""
    timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(6, ge=1)
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    prices: Prices = Prices()

    @model_validator(mode="before")
    @classmethod
    def _family_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "anthropic" and "api_key_env" not in data:
            return {**data, "api_key_env": "ANTHROPIC_API_KEY"}
        return data

    @model_validator(mode="after")
    def _template_has_slot(self) -> "UpstreamConfig":
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {instruction}")
        return self


def _on_this_machine(base_url: str | None) -> bool:
    host = urlsplit(base_url).hostname if base_url else None
    return host in ("localhost", "::1") or (host is not None and host.startswith("127."))


def upstream_api_key(cfg: UpstreamConfig) -> SecretStr:
    """The upstream key from the environment. A server on this machine (vLLM without --api-key)
    accepts any value; a hosted API without its key is refused here, before any request."""
    value = os.environ.get(cfg.api_key_env)
    if not value:
        if not _on_this_machine(cfg.base_url):
            raise ConfigError(f"upstream: set {cfg.api_key_env} (the key of {cfg.base_url or 'the API'}; "
                              "only a server on this machine needs none)")
        value = "no-key"
    return SecretStr(value)
