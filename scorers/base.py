"""The contract between the search loop and anything that scores responses.

The search never sees tokens or tensors: it hands whole response texts to a session and gets
one float per text back. Keeping the contract on text is what lets the upstream use any
vocabulary, and lets a scorer reuse work between steps however it likes, as long as the
numbers equal a full recompute.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

from proxy.types import ChatMessage


ScorerPrompt = str | Sequence[ChatMessage]
T = TypeVar("T")


def as_messages(prompt: ScorerPrompt) -> list[ChatMessage]:
    """A bare string is one user turn: the instruction the strong model is answering."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class ScorerContextError(ValueError):
    """The prompt, or the answer asked for, does not fit the scoring models' context. `field` is
    what to change: "prompt" or "max_tokens"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ScorerFailure(RuntimeError):
    """Scoring failed for a reason outside the request (a remote engine unreachable or failing
    after retries): the search cannot go on, and the same request may succeed later. The message
    names the model and the kind of failure, never an engine's own words (they may echo a key)."""


def score_args(texts: Sequence[str], finished: Sequence[bool]) -> tuple[list[str], list[bool]]:
    """A score call's texts and flags as lists; ValueError when there is not one flag per text."""
    if len(texts) != len(finished):
        raise ValueError(f"got {len(texts)} texts but {len(finished)} finished flags")
    return list(texts), [bool(f) for f in finished]


def check_room(scorer: "Scorer", prompt: "ScorerPrompt", max_new_tokens: int) -> None:
    """ScorerContextError unless a response of `max_new_tokens` tokens (counted one scorer token
    per upstream token: the check is before any call, so it cannot see the real text) and its
    EOS fit after `prompt` in the scorer's context. A text that re-tokenizes longer is no error
    later: the scorer scores the prefix that fits (scorers.room). This tokenizes the prompt: from
    the event loop, call it through `Scorer.run_tokenizing`."""
    room = scorer.response_room(prompt)
    if room is None:
        return
    if room < 2:
        raise ScorerContextError("prompt", f"the prompt fills the guide's context ({-room + 2} tokens too many "
                                           "for even a one-token answer)")
    if max_new_tokens > room - 1:
        raise ScorerContextError("max_tokens", f"at most {room - 1} for this prompt: the guide's context "
                                               f"holds the prompt and {room - 1} more tokens (and the end of text)")


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

    async def start(self) -> None:
        """What a scorer must ask the network before it serves (the remote scorer: do its engines
        serve the models, and how long a sequence may be); called once, after loading."""

    def response_room(self, prompt: ScorerPrompt) -> int | None:
        """How many tokens (in the scorer's own tokenizer, EOS included) a response to `prompt`
        may have before prompt + response passes the scoring models' context; None: no limit
        known. Checked before the upstream is called, so an impossible request costs nothing."""
        return None

    async def run_tokenizing(self, fn: Callable[[], T]) -> T:
        """`fn()` (which may tokenize with this scorer's tokenizers, e.g. `check_room` of a long
        prompt) off the event loop, never beside the scorer's own use of its tokenizers: a fast
        tokenizer used from two threads at once raises "Already borrowed". Default: on a thread
        of its own, or at once where the scorer says nothing of its room (no tokenizer read)."""
        if type(self).response_room is Scorer.response_room:
            return fn()
        return await asyncio.to_thread(fn)

    async def aclose(self) -> None:
        """Release models and worker threads."""
