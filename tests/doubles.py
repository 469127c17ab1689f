"""In-memory test doubles for the search's two collaborators.

They record every call so tests can assert the exact request pattern of a search without
HTTP or torch in the way; the HTTP and model paths have their own tests.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from proxy.types import Continuation, Conversation, SampleResult, SamplingParams, Usage
from proxy.upstreams.base import Upstream
from scorers.base import Scorer, ScorerPrompt, ScoringSession


@dataclass
class Call:
    prompt: str
    n: int
    max_tokens: int
    seed: int | None
    stop: tuple[str, ...]
    started: float = 0.0


Responder = Callable[[Call, int], Continuation]
"""(call, sample index) -> continuation."""


def words(prefix: str, count: int) -> str:
    return "".join(f" {prefix}{i}" for i in range(count))


def word_responder(finish_when: Callable[[Call, int], bool] = lambda c, i: False) -> Responder:
    """Each sample is `max_tokens` one-token words, unless `finish_when` says it ends after one word."""

    def respond(call: Call, i: int) -> Continuation:
        if finish_when(call, i):
            return Continuation(f" s{i}end", True, 1, "stop")
        return Continuation(words(f"s{i}t", call.max_tokens), False, call.max_tokens, "length")

    return respond


def flat_prompt(conversation: Conversation, partial: str) -> str:
    """The conversation and partial answer as one string, the way a scripted responder reads them:
    a raw prompt as is, messages' contents joined."""
    head = conversation.prompt if conversation.raw else "".join(m["content"] for m in conversation.messages)
    return head + partial


class ScriptedUpstream(Upstream):
    def __init__(self, respond: Responder, delay: Callable[[Call], float] = lambda c: 0.0) -> None:
        self.respond = respond
        self.delay = delay
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        prompt = flat_prompt(conversation, partial)
        call = Call(prompt, params.n, params.max_tokens, params.seed, params.stop, time.perf_counter())
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay(call))
        finally:
            self.in_flight -= 1
        conts = [self.respond(call, i) for i in range(params.n)]
        usage = Usage(len(prompt), sum(c.num_tokens for c in conts))
        self.record(usage)
        return SampleResult(conts, usage, 1)


@dataclass
class ScoreCall:
    texts: list[str]
    finished: list[bool]
    at: float


class FnSession(ScoringSession):
    def __init__(self, owner: "FnScorer") -> None:
        self.owner = owner
        self.closed = False

    async def score(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        assert not self.closed
        self.owner.calls.append(ScoreCall(list(texts), list(finished), time.perf_counter()))
        return [self.owner.fn(t, f) for t, f in zip(texts, finished)]

    def keep(self, texts: Sequence[str]) -> None:
        self.owner.kept.append(list(texts))

    def close(self) -> None:
        self.closed = True
        self.owner.open_sessions -= 1


@dataclass
class FnScorer(Scorer):
    fn: Callable[[str, bool], float]
    calls: list[ScoreCall] = field(default_factory=list)
    open_sessions: int = 0
    kept: list[list[str]] = field(default_factory=list)
    prompts: list[ScorerPrompt] = field(default_factory=list)

    def open(self, prompt: ScorerPrompt) -> ScoringSession:
        self.prompts.append(prompt)
        self.open_sessions += 1
        return FnSession(self)
