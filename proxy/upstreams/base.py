"""The contract between the search loop and a black-box model API.

An upstream turns (prompt text, n) into n continuations. The search needs to know, per
continuation, whether the model ended it (so the beam is finished) and how many tokens it
spent (so the per-beam budget is honest), plus what the API billed.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    """Tokens billed by the upstream, summed over calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass(frozen=True)
class Continuation:
    text: str
    finished: bool
    """True when the model ended the text itself (EOS or a stop sequence), not the length limit."""
    num_tokens: int
    """Upstream tokens this continuation used (exact for length-limited ones)."""
    finish_reason: str | None = None


@dataclass(frozen=True)
class SampleResult:
    continuations: list[Continuation]
    """n per prompt; for several prompts (`sample_batch`) prompt-major: prompt i's are [i*n, (i+1)*n)."""
    usage: Usage
    calls: int
    """HTTP calls that succeeded for this sample (K when the server refused n>1)."""


class Upstream(ABC):
    """A model reachable only through its API."""

    name: str = "upstream"
    max_prompts_per_call: int = 1
    """How many prompts `sample_batch` sends in one request; 1: one request per prompt."""

    @abstractmethod
    async def sample(
        self,
        prompt: str,
        *,
        n: int,
        max_tokens: int,
        stop: Sequence[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> SampleResult:
        """n continuations of `prompt`, each at most `max_tokens` tokens."""

    async def sample_batch(
        self,
        prompts: Sequence[str],
        *,
        n: int,
        max_tokens: int,
        stop: Sequence[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seeds: Sequence[int | None] | None = None,
    ) -> SampleResult:
        """n continuations of each prompt, prompt-major. This default sends one `sample` per
        prompt, all at once; an upstream whose API takes several prompts per request overrides
        it (and `max_prompts_per_call`), since fewer requests cost less CPU and rate limit."""
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        results = await asyncio.gather(*(
            self.sample(p, n=n, max_tokens=max_tokens, stop=stop, temperature=temperature, top_p=top_p, seed=s)
            for p, s in zip(prompts, seeds, strict=True)))
        return SampleResult([c for r in results for c in r.continuations],
                            sum((r.usage for r in results), Usage()), sum(r.calls for r in results))

    async def aclose(self) -> None:
        """Close connections."""

    async def __aenter__(self) -> "Upstream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
