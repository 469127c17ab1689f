"""Builds the upstream a config names: one module per API family, imported only when used."""
from __future__ import annotations

from proxy.config import AnthropicConfig, OpenAIChatConfig, OpenAICompletionsConfig, UpstreamConfig
from proxy.upstreams.base import Upstream


def make_upstream(cfg: UpstreamConfig) -> Upstream:
    upstream = _family(cfg)
    if cfg.response_cache_dir is None:
        return upstream
    from proxy.upstreams.cache import CachedUpstream

    return CachedUpstream(upstream, cfg, cfg.response_cache_dir)


def _family(cfg: UpstreamConfig) -> Upstream:
    if isinstance(cfg, OpenAICompletionsConfig):
        from proxy.upstreams.openai_completions import OpenAICompletionsUpstream

        return OpenAICompletionsUpstream(cfg)
    if isinstance(cfg, OpenAIChatConfig):
        from proxy.upstreams.openai_chat import OpenAIChatUpstream

        return OpenAIChatUpstream(cfg)
    if isinstance(cfg, AnthropicConfig):
        from proxy.upstreams.anthropic_messages import AnthropicMessagesUpstream

        return AnthropicMessagesUpstream(cfg)
    raise ValueError(f"upstream.kind: unknown kind {cfg.kind!r}")
