"""What a model behind the local completions server must do."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.protocol.model_requests import CompletionParams

__all__ = ["DEFAULT_MAX_BATCH_ROWS", "Choice", "CompletionBackend", "CompletionParams"]

DEFAULT_MAX_BATCH_ROWS = 64
"""Rows (prompts x n) a local model decodes together; a request larger than this still runs,
alone. Here, where `w2s serve-local`'s flag can read it without torch."""


@dataclass(frozen=True)
class Choice:
    """One generated continuation; `tokens` is its token count in the backend's tokenizer."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: int


class CompletionBackend(Protocol):
    """A model behind the completions wire protocol. It must run its compute off the event loop
    and return the n choices of one prompt and the prompt's token count. A seeded request must
    sample choice i as `proxy.types.choice_seed(prompt, seed, i)` says, so that each prompt of a
    list samples as it would alone."""

    async def complete(self, params: CompletionParams) -> tuple[list[Choice], int]: ...
