"""Every setting, validated by pydantic; the only place that reads env vars for them.

A config has three parts: `upstream`, `scorer` and `search` (plus `server` for `w2s serve`).
Unknown keys and impossible values are refused with a message that names the field, before any
model is loaded or any API is called. These models never read a file: preset names
(`search: cbs-w4k4l30`, `{preset: NAME, ...}`) and config files are resolved to plain mappings
by proxy.presets before validation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class ConfigError(ValueError):
    """A config or argument that cannot be used; the message names the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchConfig(Strict):
    """Chunk-level beam search. Best-of-N is w=1, k=N, l=None; plain sampling is w=k=1, l=None."""

    w: int = Field(1, ge=1, description="beam width: beams kept after each step")
    k: int = Field(1, ge=1, description="successors sampled per beam per step")
    l: int | None = Field(None, ge=1, description="chunk length in upstream tokens; None = unbounded")
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    prefer_finished: bool = False
    """Off (the paper's rule): beams are ranked by score alone, survivors and answer alike, and
    finishing counts only through the EOS term of the score. On: a beam that ran out of budget
    unfinished ranks below every finished or growing one, and the answer is the best finished
    beam when there is one (best-of-N then means "best complete answer")."""
    narrow_start: bool = False
    """Off (the paper's reference code): the first step draws W·K chunks from the prompt (one
    request, n = W·K) and keeps the best W, as every later step draws W·K. On: it draws K, so
    with K ≤ W the first selection keeps every first chunk and chooses nothing; it saves
    (W−1)·K first chunks."""
    max_upstream_tokens: int | None = Field(None, ge=1)
    """Tokens (prompt + completion) one search may be billed; None: no cap (proxy.budget)."""
    max_cost_usd: float | None = Field(None, gt=0)
    """US dollars one search may cost at the upstream's prices; None: no cap."""
    deadline_s: float | None = Field(None, gt=0)
    """Seconds one search may take, retries included; then it answers with its best beam so
    far (`stopped_by="deadline"`), and a step still running is cancelled with its upstream calls."""

    @property
    def needs_scorer(self) -> bool:
        return self.w * self.k > 1

    @property
    def mode(self) -> str:
        if not self.needs_scorer and self.l is None:
            return "base"
        if self.w == 1 and self.l is None:
            return f"bon{self.k}"
        narrow = "-narrow" if self.narrow_start and self.w > 1 else ""
        return f"cbs-w{self.w}k{self.k}l{self.l if self.l is not None else 'inf'}{narrow}"

    def fan_out(self, step: int) -> int:
        """Chunks drawn per expanded beam at `step` (1-based): W·K from the prompt at the first
        (the paper's start, one beam standing for W), K after."""
        return self.k if step > 1 or self.narrow_start else self.w * self.k


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


class ModelSpec(Strict):
    """One causal LM: a hub id or a local directory, optionally a GGUF file inside it."""

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


class ServerCaps(Strict):
    """Per-request limits, so that no client can order a search the operator did not budget for.

    A search samples W*K continuations per step and makes about W * max_tokens / L upstream
    calls in all: W*K bounds the breadth, a floor on L the number of steps (a small L is what
    multiplies calls; L = null means one chunk), max_tokens the length.
    """

    max_w_times_k: int = Field(16, ge=1)
    min_l: int = Field(8, ge=1)
    max_tokens: int = Field(2048, ge=1)


def mode_problem(mode: SearchConfig, caps: ServerCaps) -> str | None:
    if mode.w * mode.k > caps.max_w_times_k:
        return f"w*k = {mode.w * mode.k} exceeds caps.max_w_times_k = {caps.max_w_times_k}"
    if mode.l is not None and mode.l < caps.min_l:
        return f"l = {mode.l} is below caps.min_l = {caps.min_l}"
    return None


class ServerConfig(Strict):
    """`w2s serve`: the OpenAI-compatible guidance server.

    Clients pick guidance by model name: the upstream's model alone is plain sampling, and
    `<model>+<mode>` runs the search config `modes[<mode>]` (in a config file: a search preset
    name, a mapping or `{preset: NAME, ...}`, resolved by proxy.presets before validation).
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys_env: str | None = None
    """Env var holding the proxy keys clients must send (comma-separated); None = no auth."""
    modes: dict[str, SearchConfig] | None = None
    """None: every search preset is a mode under its own name, those over the caps left out
    (proxy.presets.server_modes resolves it when the server starts)."""
    caps: ServerCaps = ServerCaps()
    max_concurrent_requests: int = Field(64, ge=1)
    """Generation requests served at once; more are refused with 429 rather than queued."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    idle_timeout_s: float = Field(15.0, gt=0)
    """A connection that has not sent a whole request head for this long is closed (idle
    keep-alive connections, and clients that trickle their headers)."""
    body_timeout_s: float = Field(30.0, gt=0)
    """A request body not received in full within this long is answered 408."""
    key_budget_usd: float | None = Field(None, gt=0)
    """US dollars each proxy key (all requests together, without keys) may spend upstream, at
    the upstream's prices, for the life of this process; then 429 insufficient_quota."""
    key_budget_tokens: int | None = Field(None, ge=1)
    """The same cap in upstream tokens (prompt + completion)."""
    stream_keepalive_s: float = Field(10.0, gt=0)
    """A stream with nothing to say for this long gets an SSE comment, so proxies that cut idle
    connections do not cut a search step that is still running."""

    @model_validator(mode="after")
    def _modes_fit_caps(self) -> "ServerConfig":
        for name, mode in (self.modes or {}).items():
            if not name or "+" in name or any(c.isspace() for c in name):
                raise ValueError(f"modes: {name!r} is not a usable mode name (no '+' or spaces)")
            problem = mode_problem(mode, self.caps)
            if problem is not None:
                raise ValueError(f"modes.{name}: {problem}")
        return self


class AppConfig(Strict):
    upstream: UpstreamConfig
    scorer: ScorerConfig | None = None
    search: SearchConfig = SearchConfig()
    server: ServerConfig = Field(default_factory=ServerConfig)


def require_scorer(search: SearchConfig, have_scorer: bool) -> None:
    """Guided modes rank candidates, which needs a scorer; refuse before anything is loaded."""
    if search.needs_scorer and not have_scorer:
        raise ConfigError(f"search.{search.mode} needs a scorer (w*k > 1); add a `scorer:` section")


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted field, e.g. `search.w: ...`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc or '<config>'}: {msg}")
    return "; ".join(lines)


def search_with(base: SearchConfig, **overrides: Any) -> SearchConfig:
    """A copy of `base` with overrides, validated, errors naming `search.<field>`."""
    data = base.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "search")) from None


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


def engine_api_key(engine: EngineEndpoint) -> SecretStr:
    """A remote scorer engine's key: none when no variable is named (an engine inside the
    operator's network), and an error when the named variable is empty."""
    if engine.api_key_env is None:
        return SecretStr("no-key")
    value = os.environ.get(engine.api_key_env)
    if not value:
        raise ConfigError(f"scorer engine: set {engine.api_key_env} (the key of {engine.base_url[0]})")
    return SecretStr(value)


def server_api_keys(cfg: ServerConfig) -> list[SecretStr]:
    """Proxy keys clients must present; an operator who named a variable but left it empty gets
    an error rather than a server open to everyone."""
    if cfg.api_keys_env is None:
        return []
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    if not keys:
        raise ConfigError(f"server.api_keys_env: set {cfg.api_keys_env} to one or more comma-separated keys")
    return [SecretStr(k) for k in keys]


def cache_dir() -> Path:
    """Where fetched models live: $W2S_CACHE_DIR, else ~/.cache/w2s-proxy."""
    return Path(os.environ.get("W2S_CACHE_DIR") or Path.home() / ".cache" / "w2s-proxy")
