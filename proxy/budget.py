"""Caps on what upstream calls may cost, so a search, an API key or an evaluation run never
spends more than it was given.

A budget caps tokens billed (prompt + completion) and/or US dollars at the upstream's prices
(proxy.cost: cache reads and writes at their own rates, a bound's prompt tokens at the dearer
of the uncached and cache-write rates, since the split is known only once billed).
Budgets nest: a search's budget charges its parent too (an API key's on the server, a run's in
AlpacaEval), and a search stops before a step that could exceed any of them, then answers with
its best beam so far, marked `stopped_by="budget"`: never silently, never a step too far. What a
step may cost is bounded before it is sent, by the algorithm (`SearchAlgorithm.next_step_bound`;
for chunk-level beam search: every live beam's K samples, W·K of the prompt, at their token
limit, and the prompt tokens the last step was billed per beam).

Concurrent searches under one parent hold what their next step may cost: a step is let through
only if what was spent, what the steps in flight hold and its own bound fit every cap, and the
check and the hold are one synchronous call (`reserve`), so no other search gets in between. Its
hold is released when what it was really billed is charged, or when it fails or is cancelled.
The server holds a request's first step at admission (`admit`) and hands that hold to the step.
So a shared budget is passed only by what steps were billed beyond their bounds: at most the sum,
over the steps in flight when the last step was let through, of (billed - bound).
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from proxy.config import Prices
from proxy.cost import cost_usd, write_surcharge_usd
from proxy.types import Usage


class BudgetExhausted(RuntimeError):
    """Work not started because its budget (a run's) was already spent."""


@dataclass
class Budget:
    max_tokens: int | None = None
    max_usd: float | None = None
    prices: Prices = field(default_factory=Prices)
    parent: "Budget | None" = None
    spent: Usage = Usage()

    reserved: Usage = Usage()
    """What the steps in flight hold (`reserve`): counted by `blocker` as if spent."""

    def allows(self, usage: Usage) -> bool:
        """Would spending `usage` more stay within this budget and every parent's?"""
        return self.blocker(usage) is None

    def blocker(self, usage: Usage) -> "Budget | None":
        """The first budget, this one or a parent, that spending `usage` more would pass."""
        total = self.spent + self.reserved + usage
        if self.max_tokens is not None and total.total_tokens > self.max_tokens:
            return self
        if self.max_usd is not None and (cost_usd(total, self.prices)
                                         + write_surcharge_usd(usage, self.prices)) > self.max_usd:
            return self
        return None if self.parent is None else self.parent.blocker(usage)

    @property
    def exhausted(self) -> bool:
        """Nothing more can be spent (not even one token)."""
        return not self.allows(Usage(0, 1))

    def charge(self, usage: Usage) -> None:
        """Record what was billed, here and in every parent."""
        self.spent = self.spent + usage
        if self.parent is not None:
            self.parent.charge(usage)

    def reserve(self, usage: Usage) -> "Reservation | Budget":
        """Hold `usage` here and in every parent if it fits them all (a Reservation), else the
        budget it would pass (see `blocker`). One synchronous call: nothing runs between the
        check and the hold."""
        blocker = self.blocker(usage)
        if blocker is not None:
            return blocker
        held = Reservation(self, usage)
        b: Budget | None = self
        while b is not None:
            b.reserved = b.reserved + usage
            b = b.parent
        return held


@dataclass
class Reservation:
    """Usage held on a budget (and its parents) for a step in flight; `release` once (again is a
    no-op), after the step's real usage was charged or when it failed or was cancelled."""

    budget: Budget
    usage: Usage
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        b: Budget | None = self.budget
        while b is not None:
            b.reserved = b.reserved - self.usage
            b = b.parent


_admitted: ContextVar[Reservation | None] = ContextVar("w2s_admitted", default=None)
"""The hold a request took at admission, until its first step takes its own (same task, or a task
it started)."""


def admit(budget: Budget, usage: Usage) -> Reservation | None:
    """Hold a request's first step (`usage`) on `budget` at admission, None if it cannot pay; the
    hold is handed to the search's first step by `release_admission`."""
    held = budget.reserve(usage)
    if not isinstance(held, Reservation):
        return None
    _admitted.set(held)
    return held


def release_admission() -> None:
    """Release this request's admission hold, if any: called just before its step reserves its own."""
    held = _admitted.get()
    if held is not None:
        held.release()
