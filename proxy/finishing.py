"""Results of many coroutines in the order they finish, the rest cancelled when the consumer stops.

Shared by the client's `generate_many` and the AlpacaEval runner's fallbacks: a consumer that
stops early (an error, a budget, Ctrl-C) must not leave requests running behind it.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def as_they_finish(coroutines: Iterable[Coroutine[Any, Any, T]]) -> AsyncIterator[T]:
    """Each result as soon as its coroutine finishes; on exit, unfinished ones are cancelled and awaited."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        for fut in asyncio.as_completed(tasks):
            yield await fut
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
