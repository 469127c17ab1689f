"""Builds the upstream a config names."""
from __future__ import annotations

from proxy.config import UpstreamConfig
from proxy.upstreams.base import Upstream


def make_upstream(cfg: UpstreamConfig) -> Upstream:
    if cfg.kind == "openai-completions":
        from proxy.upstreams.openai_completions import OpenAICompletionsUpstream

        return OpenAICompletionsUpstream(cfg)
    raise ValueError(f"upstream.kind: unknown kind {cfg.kind!r}")
