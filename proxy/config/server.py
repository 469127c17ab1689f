"""`w2s serve`: where it listens, which modes it offers, and what one request or key may order."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pydantic import Field, SecretStr, model_validator

from proxy.config.base import ConfigError, Strict
from proxy.config.search import SearchConfig


class ServerCaps(Strict):
    """Per-request limits, so that no client can order a search the operator did not budget for.

    A search samples W*K continuations per step and makes about W * max_tokens / L upstream
    calls in all: W*K bounds the breadth, a floor on L the number of steps (a small L is what
    multiplies calls; L = null means one chunk), max_tokens the length.
    """

    max_w_times_k: int = Field(16, ge=1)
    min_l: int = Field(8, ge=1)
    max_tokens: int = Field(2048, ge=1)


@dataclass(frozen=True)
class CapProblem:
    """A search over the operator's caps: the one check (`cap_problem`), worded for a config
    file (`for_config`) or for a client's request (`for_request`, with the field to name)."""

    param: str
    """The request field that ordered it: `w2s` (W times K) or `w2s.l`."""
    what: str
    cap: str
    limit: int
    below: bool

    def for_config(self) -> str:
        return f"{self.what} {'is below' if self.below else 'exceeds'} caps.{self.cap} = {self.limit}"

    def for_request(self) -> str:
        if self.below:
            return f"{self.what} is below this server's minimum chunk length of {self.limit}"
        return f"{self.what} exceeds this server's cap of {self.limit}"


def cap_problem(search: Any, caps: ServerCaps) -> CapProblem | None:
    """Is `search` (a SearchConfig) wider, or its chunks shorter, than `caps` allow? Its width is
    the most samples one step draws: W·K, or with a sample schedule its first entry (one beam,
    the prompt) and W times each later one."""
    if search.sample_schedule:
        first, *later = search.sample_schedule
        widest = max(first, search.w * max(later or [first]))
        if widest > caps.max_w_times_k:
            return CapProblem("w2s.sample_schedule", f"samples per step = {widest}", "max_w_times_k",
                              caps.max_w_times_k, False)
    elif search.w * search.k > caps.max_w_times_k:
        return CapProblem("w2s", f"w*k = {search.w * search.k}", "max_w_times_k", caps.max_w_times_k, False)
    if search.l is not None and search.l < caps.min_l:
        return CapProblem("w2s.l", f"l = {search.l}", "min_l", caps.min_l, True)
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
    shutdown_grace_s: float = Field(10.0, gt=0)
    """On SIGTERM (or Ctrl-C), how long requests in flight may finish; searches still running at
    0.8 of it are ended with `server_shutting_down` (a 503, in-band for a stream)."""
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
    passthrough: bool = True
    """In plain mode, chat requests using what only the upstream can honour (tools and tool
    results, a response format, logprobs, n > 1, images) are forwarded to a chat upstream as
    they are (proxy.serving.passthrough); off, they are refused with a 400 naming the field, as
    in a guided mode."""
    otel: bool = False
    """Export OpenTelemetry spans (request, search step, upstream call, scoring) over OTLP/HTTP,
    to where OTEL_EXPORTER_OTLP_ENDPOINT says (the exporter reads it); needs the `otel` extra.
    Off: spans still reach a tracer provider set up by someone else (`opentelemetry-instrument`)."""

    @model_validator(mode="after")
    def _modes_fit_caps(self) -> "ServerConfig":
        for name, mode in (self.modes or {}).items():
            if not name or "+" in name or any(c.isspace() for c in name):
                raise ValueError(f"modes: {name!r} is not a usable mode name (no '+' or spaces)")
            problem = cap_problem(mode, self.caps)
            if problem is not None:
                raise ValueError(f"modes.{name}: {problem.for_config()}")
        return self


def server_api_keys(cfg: ServerConfig) -> list[SecretStr]:
    """Proxy keys clients must present; an operator who named a variable but left it empty gets
    an error rather than a server open to everyone."""
    if cfg.api_keys_env is None:
        return []
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    if not keys:
        raise ConfigError(f"server.api_keys_env: set {cfg.api_keys_env} to one or more comma-separated keys")
    return [SecretStr(k) for k in keys]
