"""The contract between the search loop and a black-box model API.

An upstream turns (conversation, partial answer, SamplingParams) into n continuations of the
partial answer. Each API family renders the pair its own way: a completions API gets one
prompt (the conversation through a template, then the partial answer), a chat API gets the
messages with the partial answer as the final assistant turn to continue. The text of a
continuation is exactly what extends the partial answer, so the search keeps beams as the
concatenation of their chunks whatever the family. The search needs to
know, per continuation, whether the model ended it (so the beam is finished) and how many
tokens it spent (so the per-beam budget is honest), plus what the API billed. An upstream also
keeps the running total of everything it was billed (`usage`, `api_calls`: failed searches'
requests included) and says whether it can serve right now (`probe`).

Every family fits a continuation in the model's context window the same way (`room`, and
`window_full` when nothing fits), and fails with our own error (proxy.upstreams.errors), never
its SDK's.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace

from proxy.cost import count_tokens
from proxy.types import Continuation, Conversation, Probe, SampleResult, SamplingParams, Usage


def conversation_key(conversation: Conversation) -> str:
    """The same for every request about one conversation, whatever the partial answer: what a
    provider's prompt cache is asked to key on (`cache_affinity`) and what an upstream remembers
    having cached it under. A hash, so the text is not repeated."""
    text = json.dumps([list(conversation.messages), conversation.raw], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Upstream(ABC):
    """A model reachable only through its API.

    An implementation answers `sample` (and may answer `sample_batch` in fewer requests), and
    calls `record` once for every API call that was billed, as soon as it is.
    """

    name: str = "upstream"
    max_prompts_per_call: int = 1
    """How many prompts `sample_batch` sends in one request; 1: one request per prompt."""
    usage: Usage = Usage()
    """Everything this upstream was billed so far."""
    api_calls: int = 0
    """API calls that succeeded so far."""
    context_window: int | None = None
    """Tokens the model's context holds, prompt and answer; None: unknown, nothing is capped."""
    encoding: str = "cl100k_base"
    """The tiktoken encoding prompts are counted in against `context_window` (an approximation
    for a model with another tokenizer)."""

    @abstractmethod
    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        """`params.n` continuations of the answer `partial` to `conversation`, each at most
        `params.max_tokens` tokens."""

    async def sample_batch(self, conversation: Conversation, partials: Sequence[str], params: SamplingParams,
                           seeds: Sequence[int | None] | None = None) -> SampleResult:
        """`params.n` continuations of each partial answer, partial-major; partial i is seeded
        with `seeds[i]` (default: `params.seed` for every one). This default sends one `sample`
        per partial, all at once; an upstream whose API takes several prompts per request
        overrides it (and `max_prompts_per_call`), since fewer requests cost less CPU and rate
        limit, and seeds such a request with `proxy.types.request_seed(seeds)`."""
        per_prompt = list(seeds) if seeds is not None else [params.seed] * len(partials)
        results = await asyncio.gather(*(self.sample(conversation, p, replace(params, seed=s))
                                         for p, s in zip(partials, per_prompt, strict=True)))
        return SampleResult.joined(results)

    def room(self, prompt: Sequence[str], max_tokens: int) -> int:
        """How many tokens a continuation may use: `max_tokens`, or less where the context window
        cannot hold the prompt (its texts, as the family sends them) and that many more. Below 1
        the window is full: nothing is sent, and `window_full` is the answer."""
        if self.context_window is None:
            return max_tokens
        return min(max_tokens, self.context_window - sum(count_tokens(t, self.encoding) for t in prompt))

    @staticmethod
    def window_full(n: int) -> SampleResult:
        """The answer when the context window is full: `n` unfinished empty continuations of 0
        tokens, no call, nothing billed."""
        return SampleResult([Continuation("", False, 0, "length")] * n, Usage(), 0)

    def record(self, usage: Usage, calls: int = 1) -> None:
        """Add what the API billed for `calls` calls to the running totals."""
        self.usage = self.usage + usage
        self.api_calls += calls

    async def probe(self) -> Probe:
        """Can it serve now, without retries? The default is an in-process upstream: always."""
        return Probe("in-process")

    async def aclose(self) -> None:
        """Close connections."""

    async def __aenter__(self) -> "Upstream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
