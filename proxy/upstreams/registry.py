"""Builds the upstream a config names: one module per API family, imported only when used."""
from __future__ import annotations

from proxy.config import UpstreamConfig
from proxy.upstreams.base import Upstream


def make_upstream(cfg: UpstreamConfig) -> Upstream:
    upstream = _family(cfg)
    if cfg.response_cache_dir is None:
        return upstream
    from proxy.upstreams.cache import CachedUpstream

    return CachedUpstream(upstream, cfg, cfg.response_cache_dir)


def _family(cfg: UpstreamConfig) -> Upstream:
    if cfg.kind == "openai-completions":
        from proxy.upstreams.openai_completions import OpenAICompletionsUpstream

        return OpenAICompletionsUpstream(cfg)
    if cfg.kind == "openai-chat":
        from proxy.upstreams.openai_chat import OpenAIChatUpstream

        return OpenAIChatUpstream(cfg)
    if cfg.kind == "anthropic":
        from proxy.upstreams.anthropic_messages import AnthropicMessagesUpstream

        return AnthropicMessagesUpstream(cfg)
    raise ValueError(f"upstream.kind: unknown kind {cfg.kind!r}")
