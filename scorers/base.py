"""The contract between the search loop and anything that scores responses.

The search never sees tokens or tensors: it hands whole response texts to a session and gets
one float per text back. Keeping the contract on text is what lets the upstream use any
vocabulary, and lets a scorer reuse work between steps however it likes, as long as the
numbers equal a full recompute.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from proxy.types import ChatMessage


ScorerPrompt = str | Sequence[ChatMessage]


def as_messages(prompt: ScorerPrompt) -> list[ChatMessage]:
    """A bare string is one user turn: the instruction the strong model is answering."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class ScoringSession(ABC):
    """Scores responses to one prompt; owns whatever per-prompt state (tokens, caches) it needs."""

    @abstractmethod
    async def score(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        """Full score of each whole response text so far (EOS included where finished)."""

    def keep(self, texts: Sequence[str]) -> None:
        """Only these responses will be extended (the survivors); a scorer may free the rest now."""

    @abstractmethod
    def close(self) -> None:
        """Free everything the session holds. Idempotent."""

    def __enter__(self) -> "ScoringSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Scorer(ABC):
    """Factory of sessions; holds the models."""

    name: str = "scorer"

    @abstractmethod
    def open(self, prompt: ScorerPrompt) -> ScoringSession:
        """Start scoring responses to `prompt` (an instruction or a list of chat messages)."""

    async def aclose(self) -> None:
        """Release models and worker threads."""
