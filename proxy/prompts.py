"""Checking chat messages, and rendering a conversation as one completion prompt.

The scorer renders the same messages with its own chat template; a chat upstream sends them as
messages; a completions upstream gets this plain-text rendering (AlpacaEval's own format by
default) followed by the partial answer.
"""
from __future__ import annotations

from collections.abc import Sequence

from proxy.config import OpenAICompletionsConfig
from proxy.types import ChatMessage, Conversation

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """Messages that cannot be rendered (request data, not configuration): `param` names the
    field of the request, so the server answers a 400 about it."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param


def render_instruction(instruction: str, cfg: OpenAICompletionsConfig) -> str:
    return cfg.prompt_template.replace("{instruction}", instruction)


def chat_conversation(messages: Sequence[ChatMessage]) -> Conversation:
    """Messages as a conversation to answer; PromptError naming the field when they are not one."""
    check_messages(messages)
    return Conversation.chat(messages)


def render(conv: Conversation, cfg: OpenAICompletionsConfig) -> str:
    """The completion prompt of `conv`: a raw prompt as is, messages through the template."""
    return conv.prompt if conv.raw else render_chat(conv.messages, cfg)


def check_messages(messages: Sequence[ChatMessage]) -> None:
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


def render_chat(messages: Sequence[ChatMessage], cfg: OpenAICompletionsConfig) -> str:
    check_messages(messages)
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(render_instruction(m["content"], cfg))
        else:
            fmt = cfg.chat.system if m["role"] == "system" else cfg.chat.assistant
            parts.append(fmt.replace("{content}", m["content"]))
    return "".join(parts)
