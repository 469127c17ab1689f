"""Every setting, validated by pydantic; the only place that reads env vars for them.

A config has three parts: `upstream`, `scorer` and `search` (plus `server` for `w2s serve`).
Unknown keys and impossible values are refused with a message that names the field, before any
model is loaded or any API is called. These models never read a file: preset names
(`search: cbs-w4k4l30`, `{preset: NAME, ...}`) and config files are resolved to plain mappings
by proxy.presets before validation.
"""
from __future__ import annotations

from pydantic import Field

from proxy.config.base import ConfigError, Strict, cache_dir, format_validation_error
from proxy.config.scorer import EngineEndpoint, ModelSpec, ScorerConfig, engine_api_key
from proxy.config.search import SETTINGS, SearchConfig, Setting, search_with
from proxy.config.server import CapProblem, ServerCaps, ServerConfig, cap_problem, server_api_keys
from proxy.config.upstream import (
    AnthropicConfig, ChatContinuation, ChatRenderConfig, OpenAIChatConfig, OpenAICompatibleConfig,
    OpenAICompletionsConfig, Prices, UpstreamBase, UpstreamConfig, UpstreamKind, answer_shaping, parse_upstream,
    upstream_api_key,
)

__all__ = [
    "AppConfig", "CapProblem", "ChatContinuation", "SETTINGS", "Setting", "ChatRenderConfig", "ConfigError", "EngineEndpoint", "ModelSpec", "Prices",
    "ScorerConfig", "SearchConfig", "ServerCaps", "ServerConfig", "Strict", "UpstreamConfig", "UpstreamKind", "AnthropicConfig", "OpenAIChatConfig",
    "OpenAICompatibleConfig", "OpenAICompletionsConfig", "UpstreamBase", "answer_shaping", "parse_upstream",
    "cache_dir", "engine_api_key", "format_validation_error", "cap_problem", "search_with",
    "server_api_keys", "upstream_api_key",
]


class AppConfig(Strict):
    upstream: UpstreamConfig
    scorer: ScorerConfig | None = None
    search: SearchConfig = SearchConfig()
    server: ServerConfig = Field(default_factory=ServerConfig)
