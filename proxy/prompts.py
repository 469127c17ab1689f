"""Turning instructions and chat messages into one completion prompt for the upstream.

The scorer renders the same messages with its own chat template; the upstream, a
completions model, gets this plain-text rendering (AlpacaEval's own format by default).
"""
from __future__ import annotations

from collections.abc import Sequence

from proxy.config import UpstreamConfig
from scorers.base import ChatMessage

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """Messages that cannot be rendered (request data, not configuration): `param` names the
    field of the request, so the server answers a 400 about it."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param


def render_instruction(instruction: str, cfg: UpstreamConfig) -> str:
    return cfg.prompt_template.replace("{instruction}", instruction)


def render_chat(messages: Sequence[ChatMessage], cfg: UpstreamConfig) -> str:
    """Messages must end with a user turn: the response answers it."""
    if not messages:
        raise PromptError("messages", "at least one message is required")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise PromptError(f"messages.{i}.role", f"must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise PromptError(f"messages.{i}.content", "must be a string")
    if messages[-1]["role"] != "user":
        raise PromptError("messages", "the last message must come from the user")
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(render_instruction(m["content"], cfg))
        else:
            fmt = cfg.chat.system if m["role"] == "system" else cfg.chat.assistant
            parts.append(fmt.replace("{content}", m["content"]))
    return "".join(parts)
