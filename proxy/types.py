"""The plain data that crosses boundaries: chat messages, sampling parameters, what an upstream
answers and bills, and the seeds of a search. Depends on nothing in this project.

Seeds are derived here and nowhere else. A seeded search gives each (step, beam) its own
request seed (`derive_seed`); an upstream that sends one request for several prompts seeds it
from all of theirs (`request_seed`); one that stands in n=1 requests for an n>1 request seeds
sample i from the request's seed (`sample_seed`). All three are stable across processes and
machines (plain integer arithmetic, no `hash()`), and None (unseeded) stays None. A server we
run ourselves (the local model server, the toy test model) seeds choice i of a prompt with
`choice_seed`, the same way in both, and as the n=1 request seeded `sample_seed` would be.

Stop sequences are found here too (`first_stop`): the search, the local model server and the
toy model must agree to the character on where a stop sequence cuts a text.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict


class ChatMessage(TypedDict):
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """What an answer responds to, before any API renders it; the search keeps it and the
    growing partial answer apart, so each upstream family renders the pair its own way.

    Chat messages end with a user turn. `raw` marks a completion prompt sent as is (POST
    /v1/completions, `w2s generate --raw`): a completions API continues the text itself; a
    chat API and the scorer see it as one user turn.
    """

    messages: tuple[ChatMessage, ...]
    raw: bool = False

    @classmethod
    def chat(cls, messages: Sequence[ChatMessage]) -> "Conversation":
        return cls(tuple({"role": m["role"], "content": m["content"]} for m in messages))  # type: ignore[misc]

    @classmethod
    def instruction(cls, text: str) -> "Conversation":
        """One user turn: the AlpacaEval setting."""
        return cls(({"role": "user", "content": text},))

    @classmethod
    def completion(cls, prompt: str) -> "Conversation":
        return cls(({"role": "user", "content": prompt},), raw=True)

    @property
    def prompt(self) -> str:
        """The raw completion prompt (only for `raw`)."""
        if not self.raw:
            raise ValueError("not a raw completion prompt")
        return self.messages[0]["content"]

    @property
    def scorer_prompt(self) -> "str | list[ChatMessage]":
        """What the scoring pair conditions on, rendered by each model's own chat template."""
        return self.prompt if self.raw else list(self.messages)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One upstream request: n continuations of at most `max_tokens` tokens each."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cache_key: str | None = None
    """Not a sampling setting: the key that asks a provider to route every request of one
    conversation to the same prompt cache (proxy.upstreams.base.conversation_key), sent where
    the upstream's `cache_affinity` says."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"SamplingParams: n and max_tokens must be at least 1 (n={self.n}, "
                             f"max_tokens={self.max_tokens})")
        object.__setattr__(self, "stop", tuple(self.stop))  # a list given by a caller stays hashable


@dataclass(frozen=True)
class Usage:
    """Tokens billed by the upstream, summed over calls.

    `prompt_tokens` counts every prompt token billed: those read from the provider's prompt
    cache (`cached_tokens`), those written to it (`cache_write_tokens`, Anthropic and OpenRouter)
    and the rest (`uncached_prompt_tokens`). A provider that reports no cache counts leaves
    both at 0: all its prompt tokens are uncached."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens,
                     self.cached_tokens + other.cached_tokens, self.cache_write_tokens + other.cache_write_tokens)

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens - other.prompt_tokens, self.completion_tokens - other.completion_tokens,
                     self.cached_tokens - other.cached_tokens, self.cache_write_tokens - other.cache_write_tokens)


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
    """API calls that succeeded for this sample (K when the server refused n>1)."""

    @classmethod
    def joined(cls, results: Sequence["SampleResult"]) -> "SampleResult":
        """Several prompts' results as one, in order, usage and calls summed."""
        return cls([c for r in results for c in r.continuations],
                   sum((r.usage for r in results), Usage()), sum(r.calls for r in results))


ProbeState = Literal["reachable", "in-process", "refused", "unreachable", "model unknown", "failed"]


@dataclass(frozen=True)
class Probe:
    """Whether an upstream can serve now: `state` one of ProbeState, `detail` what it adds
    ("HTTP 401", "APIConnectionError", the model it does not list)."""

    state: ProbeState
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("reachable", "in-process")

    def __str__(self) -> str:
        """As readiness reports it: "reachable", "refused: HTTP 401", ..."""
        return f"{self.state}: {self.detail}" if self.detail else self.state


# ---------------------------------------------------------------------------------- seeds

SEED_MODULUS = 2**31 - 1
"""Seeds stay below this (a prime): every API we know takes a 32-bit signed seed."""


def derive_seed(seed: int | None, step: int, beam: int) -> int | None:
    """The request seed of beam `beam` at step `step` of a search seeded with `seed`: distinct
    for every (step, beam) of a search (beam < 8191), so beams do not sample identical chunks."""
    if seed is None:
        return None
    return (seed * 1_000_003 + step * 8_191 + beam) % SEED_MODULUS


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` when one n>1 request is sent as n requests with n=1: sample 0
    keeps the request's seed (an n=1 request is seeded as asked); the others are mixed apart,
    so they do not coincide with a neighbouring beam's request seed as `seed + index` would."""
    if seed is None or index == 0:
        return seed
    return (seed * 69_069 + index * 2_147_483_587 + 12_345) % SEED_MODULUS


def request_seed(seeds: Sequence[int | None]) -> int | None:
    """The one seed of a request that carries several prompts (an API takes one per request),
    from all of the prompts' seeds in order: one prompt keeps its own; none seeded gives None.
    Each prompt then samples as it would alone under that seed (on a server that seeds per
    prompt and choice, as vLLM and our loopback server do)."""
    if all(s is None for s in seeds):
        return None
    if len(seeds) == 1:
        return seeds[0]
    mixed = len(seeds)
    for s in seeds:
        mixed = (mixed * 1_000_003 + (0 if s is None else s + 1)) % SEED_MODULUS
    return mixed


def stable_int(*parts: object) -> int:
    """A 64-bit integer from `parts` that is the same in every process (unlike `hash`)."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def choice_seed(prompt: str, seed: int, index: int) -> int:
    """The random seed of choice `index` for `prompt` on a server we run that was asked for `seed`:
    each prompt of a list samples as it would alone, and the choices of a request differ. Choice
    `index` is choice 0 of the n=1 request seeded `sample_seed(seed, index)`, so an answer with
    fewer choices than asked, completed by n=1 requests (proxy.upstreams.capability.n_choices),
    is the full answer: every sample keeps the seed it would have had."""
    return stable_int("sample", prompt, sample_seed(seed, index), 0)


# ---------------------------------------------------------------------------------- stops

MAX_STOP = 4
"""Stop sequences one request may carry (OpenAI's limit)."""


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest-starting stop sequence begins in `text` (the API cuts there), or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
