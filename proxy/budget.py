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
limit, and the prompt tokens the last step was billed per beam); concurrent searches under one
parent each check for themselves, so the parent can be passed by at most one step per search in
flight.
"""
from __future__ import annotations

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

    def allows(self, usage: Usage) -> bool:
        """Would spending `usage` more stay within this budget and every parent's?"""
        return self.blocker(usage) is None

    def blocker(self, usage: Usage) -> "Budget | None":
        """The first budget, this one or a parent, that spending `usage` more would pass."""
        total = self.spent + usage
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
