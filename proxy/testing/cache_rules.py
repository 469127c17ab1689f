"""Providers' prompt-cache rules as their documentation states them, as pure functions: the fakes
answer with them and `benchmarks/billing.py` prices a search's exact requests with them, so a
rule is written once.

Each takes what a request's prompt is made of and what the cache held *when the request
arrived* (entries written by requests still in flight are not there: parallel twins never read
each other's), and says how many prompt tokens were read from the cache (and written to it).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of `a` and `b`."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class AnthropicCacheUse:
    """A request's input split as Anthropic's usage reports it, and the prefixes it left cached."""

    input_tokens: int
    """Prompt tokens after the last cacheable breakpoint: neither read nor written."""
    read: int
    """`cache_read_input_tokens`."""
    write: int
    """`cache_creation_input_tokens`."""
    cached: tuple[str, ...]


def anthropic_cache_use(blocks: Sequence[str], marks: Sequence[bool], available: Collection[str],
                        tokens: Callable[[str], int], min_tokens: int, sep: str = "\n") -> AnthropicCacheUse:
    """Anthropic's prompt caching (less expiry and the 20-block lookback): every block marked
    `cache_control` ends a prefix (the blocks up to it, joined by `sep`) that is cached once it
    reaches the model's minimum; a request reads the longest marked prefix already cached, writes
    the rest up to its last cacheable mark, and pays full price for what follows."""
    prefixes = [sep.join(blocks[:i + 1]) for i, marked in enumerate(marks) if marked]
    cacheable = [p for p in prefixes if tokens(p) >= min_tokens]
    read = max((tokens(p) for p in cacheable if p in available), default=0)
    last = tokens(cacheable[-1]) if cacheable else 0
    return AnthropicCacheUse(max(tokens(sep.join(blocks)) - max(read, last), 0), read, max(last - read, 0),
                             tuple(cacheable))


def deepseek_units(prompt: Sequence[int], answered: Sequence[int]) -> list[tuple[int, ...]]:
    """The cache prefix units a DeepSeek request leaves (its docs, "Context Caching", 2026): one at
    the end of the user input (`prompt`) and one at the end of the model output (`answered`: the
    prompt and the output as one sequence). Units DeepSeek also cuts at common prefixes it
    detects and at fixed intervals of long inputs are not modelled: a lower bound on hits."""
    return [tuple(prompt), tuple(answered)]


def deepseek_hit(prompt: Sequence[int], units: Collection[tuple[int, ...]]) -> int:
    """Cached tokens of a DeepSeek prompt: the longest unit the prompt begins with in full (a unit
    matched in part is a miss, since V4's sliding-window attention stores whole units)."""
    p = tuple(prompt)
    return max((len(u) for u in units if len(u) <= len(p) and p[:len(u)] == u), default=0)


def block_prefix_hit(prompt: Sequence[int], seen: Collection[Sequence[int]], block_size: int) -> int:
    """Cached tokens of a vLLM prompt (automatic prefix caching): the longest prefix shared with a
    sequence it computed before (prompts and generated tokens alike), in whole KV blocks, and
    never the whole prompt (its last token is always computed, to sample from)."""
    best = max((shared_prefix(prompt, s) for s in seen), default=0)
    return min(best, len(prompt) - 1) // block_size * block_size if prompt else 0
