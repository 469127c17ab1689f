"""Gathers scoring requests from many coroutines into one job for the worker thread.

Many searches run at once in the server, each sending a few candidates at a time. Run one by
one, every request pays a forward pass of its own; gathered, one pass scores them all. A request
waits at most `wait_s` for company (or less, once `max_items` are pending), and while the worker
is busy requests pile up and go together in the next job, so the device stays busy under load
and idle requests are not held back. The event loop only appends and awaits; the job runs on the
given executor.

State is kept per event loop, so a scorer used from several loops in turn (tests, notebooks
calling asyncio.run repeatedly) still works.
"""
from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

RunJob = Callable[[list[T]], Sequence["R | BaseException"]]


@dataclass
class _Pending(Generic[T, R]):
    item: T
    size: int
    future: asyncio.Future[R]
    since: float


@dataclass
class _LoopState(Generic[T, R]):
    pending: list[_Pending[T, R]] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class MicroBatcher(Generic[T, R]):
    """`await submit(item)` returns the item's result from the next job `run` processes.

    `run` gets a list of items and returns one result or exception per item (an exception that
    belongs to one request must not fail the others); it runs on `executor`, never on the loop.
    """

    def __init__(self, run: RunJob[T, R], executor: Executor, *, max_items: int, wait_s: float,
                 size: Callable[[T], int] = lambda _: 1) -> None:
        if max_items < 1 or wait_s < 0:
            raise ValueError("max_items must be at least 1 and wait_s at least 0")
        self._run = run
        self._executor = executor
        self.max_items = max_items
        self.wait_s = wait_s
        self._size = size
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState[T, R]] = weakref.WeakKeyDictionary()
        self.jobs = 0
        """Jobs run so far (over all loops): fewer jobs than requests means requests were gathered."""

    def _state(self) -> _LoopState[T, R]:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        return state

    async def submit(self, item: T) -> R:
        state = self._state()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        state.pending.append(_Pending(item, self._size(item), future, time.monotonic()))
        if sum(p.size for p in state.pending) >= self.max_items:
            state.wakeup.set()
        if state.task is None or state.task.done():
            state.task = asyncio.create_task(self._dispatch(state))
        return await future

    async def drain(self) -> None:
        """Wait until everything submitted on this loop has run."""
        state = self._states.get(asyncio.get_running_loop())
        while state is not None and state.task is not None and not state.task.done():
            await asyncio.shield(state.task)

    async def _dispatch(self, state: _LoopState[T, R]) -> None:
        loop = asyncio.get_running_loop()
        while state.pending:
            deadline = state.pending[0].since + self.wait_s
            while sum(p.size for p in state.pending) < self.max_items and (left := deadline - time.monotonic()) > 0:
                state.wakeup.clear()
                try:
                    await asyncio.wait_for(state.wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = self._take(state)
            try:
                results = await loop.run_in_executor(self._executor, self._run, [p.item for p in batch])
            except BaseException as e:  # the executor is gone, or the job itself broke
                results = [e] * len(batch)
                if isinstance(e, asyncio.CancelledError):
                    for p in batch + state.pending:
                        p.future.cancel()
                    raise
            self.jobs += 1
            for p, result in zip(batch, results):
                if p.future.done():  # its caller was cancelled
                    continue
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)

    def _take(self, state: _LoopState[T, R]) -> list[_Pending[T, R]]:
        """The oldest requests up to `max_items` (always at least one, however big)."""
        taken, total = 0, 0
        for p in state.pending:
            if taken and total + p.size > self.max_items:
                break
            taken += 1
            total += p.size
        batch, state.pending = state.pending[:taken], state.pending[taken:]
        return batch
