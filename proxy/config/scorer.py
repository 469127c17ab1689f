"""The guidance pair: its two models, where they run and how they are batched and cached."""
from __future__ import annotations

import os
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from proxy.config.base import ConfigError, Strict


class EngineEndpoint(Strict):
    """Where a remote scorer's model runs: OpenAI-compatible servers that return prompt
    log-probabilities (vLLM's /v1/completions with `prompt_logprobs`), all serving the same
    weights; requests go to the one with the fewest in flight."""

    base_url: list[str] = Field(min_length=1)
    """One base URL (`http://host:8001/v1`) or a list of replicas."""
    model: str | None = None
    """The name the engine serves the model under; None: the ModelSpec's `path`."""
    api_key_env: str | None = None
    """The environment variable holding the engines' key (vLLM --api-key); None: no key sent."""
    timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(4, ge=1)
    """Tries per request, over the replicas in turn (a refused or broken answer moves on)."""
    max_concurrency: int = Field(32, ge=1)
    """Requests in flight per base URL."""

    @model_validator(mode="before")
    @classmethod
    def _one_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("base_url"), str):
            return {**data, "base_url": [data["base_url"]]}
        return data

    @model_validator(mode="after")
    def _urls(self) -> "EngineEndpoint":
        for url in self.base_url:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
                raise ValueError(f"base_url: {url!r} is not an http(s) URL")
        return self


class ModelPathMissing(ValueError):
    """A model path that can only mean a local one names nothing on disk (raised before the hub,
    which would call it a malformed repo id)."""


def looks_local(path: str) -> bool:
    """Absolute, relative with ./ or ../, under ~, or with more than one "/": not a hub id
    (`name` or `org/name`)."""
    return os.path.isabs(path) or path.startswith(("./", "../", ".\\", "..\\", "~")) or path.count("/") > 1 \
        or "\\" in path


def check_local_model(path: str, what: str = "model") -> None:
    """Raise ModelPathMissing when `path` can only be local and does not exist."""
    if looks_local(path) and not os.path.exists(path):
        raise ModelPathMissing(f"{what} path {path}: no such local directory (a hub model is named "
                               "NAME or ORG/NAME)")


class ModelSpec(Strict):
    """One causal LM: a hub id or a local directory, optionally a GGUF file inside it. `~` in
    `path` and `adapter` is expanded."""

    path: str
    gguf_file: str | None = None
    chat_template: str | None = None
    """A jinja chat template, a name from scorers.templates, or None for the tokenizer's own."""
    system_prompt: str | None = ""
    """System turn prepended when the messages have none; None = no system turn."""
    revision: str | None = None
    adapter: str | None = None
    """A PEFT LoRA adapter directory, merged into the weights at load: how a guide tuned the
    paper's way (a small delta on its untuned parent) ships without a second full checkpoint.
    Part of the model's identity: `path` with and without an adapter are different weights."""
    engine: EngineEndpoint | None = None
    """scorer.kind remote only: the engine that holds the weights. `path` is then read for the
    tokenizer and its chat template alone (no weights are loaded here)."""

    @field_validator("path", "adapter")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if value is not None and value.startswith("~") else value


class ScorerConfig(Strict):
    """The guidance pair. `implicit`: both models in this process (scorers.implicit). `remote`:
    the same score with each model behind an engine (`engine:` on both sides, scorers.remote);
    the settings of local forward passes (device, dtype, caches, ExPO) do not apply to it."""

    kind: Literal["implicit", "remote"] = "implicit"
    tuned: ModelSpec
    untuned: ModelSpec
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(8, ge=1)
    max_batch_tokens: int = Field(16384, ge=1)
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """None = transformers' default (SDPA); "eager" is bit-identical across batch shapes."""
    incremental: bool = True
    """Reuse each beam's KV cache so only new tokens run; false = full recompute every call (the baseline)."""
    max_cached_tokens: int | None = Field(65536, ge=1)
    """Token positions kept in KV caches, both models together (~8 GiB for a 7B pair in bf16);
    least recently used sessions drop theirs beyond it. None = unbounded."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """How long a scoring request waits for others (from any search) to share a forward pass."""
    expo_alpha: float | None = None
    """ExPO: load the tuned model as tuned + alpha * (tuned - untuned); same architecture only."""
    torch_threads: int | None = Field(None, ge=1)
    """torch's CPU thread pool (process-wide), set when the scorer loads; None = torch's default.
    On a CPU-only box that also samples (serve-local), half the cores each avoids oversubscription."""

    @model_validator(mode="after")
    def _engines_match_kind(self) -> "ScorerConfig":
        sides = {"tuned": self.tuned, "untuned": self.untuned}
        if self.kind == "implicit":
            for name, spec in sides.items():
                if spec.engine is not None:
                    raise ValueError(f"{name}.engine: only for scorer.kind remote (implicit loads the weights here)")
            return self
        for name, spec in sides.items():
            if spec.engine is None:
                raise ValueError(f"{name}.engine: scorer.kind remote needs the engine that serves {spec.path}")
            if spec.adapter is not None:
                raise ValueError(f"{name}.adapter: a remote model's adapter is the engine's to serve "
                                 "(vLLM --lora-modules NAME=DIR); name it in engine.model")
        if self.expo_alpha is not None:
            raise ValueError("expo_alpha: ExPO edits weights, which a remote scorer does not hold")
        return self


def engine_api_key(engine: EngineEndpoint) -> SecretStr:
    """A remote scorer engine's key: none when no variable is named (an engine inside the
    operator's network), and an error when the named variable is empty."""
    if engine.api_key_env is None:
        return SecretStr("no-key")
    value = os.environ.get(engine.api_key_env)
    if not value:
        raise ConfigError(f"scorer engine: set {engine.api_key_env} (the key of {engine.base_url[0]})")
    return SecretStr(value)
