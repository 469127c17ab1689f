"""Turning instructions and chat messages into one completion prompt for the upstream.

The scorer renders the same messages with its own chat template; the upstream, a
completions model, gets this plain-text rendering (AlpacaEval's own format by default).
"""
from __future__ import annotations

from collections.abc import Sequence

from proxy.config import ConfigError, UpstreamConfig
from scorers.base import ChatMessage

ROLES = ("system", "user", "assistant")


def render_instruction(instruction: str, cfg: UpstreamConfig) -> str:
    return cfg.prompt_template.replace("{instruction}", instruction)


def render_chat(messages: Sequence[ChatMessage], cfg: UpstreamConfig) -> str:
    """Messages must end with a user turn: the response answers it."""
    if not messages:
        raise ConfigError("messages: at least one message is required")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ConfigError(f"messages.{i}.role: must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ConfigError(f"messages.{i}.content: must be a string")
    if messages[-1]["role"] != "user":
        raise ConfigError("messages: the last message must come from the user")
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(render_instruction(m["content"], cfg))
        else:
            fmt = cfg.chat.system if m["role"] == "system" else cfg.chat.assistant
            parts.append(fmt.replace("{content}", m["content"]))
    return "".join(parts)
