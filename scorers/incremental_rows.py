"""The plan of an incremental forward: which tokens each sequence still has to run, and on what.

A `Row` is (cached past, new tokens): the session's longest cached prefix that shares tokens
with the sequence, cut back where the new tokenization differs from it (a rolled-back seam), and
the tokens after that. Kept apart from the forward pass (scorers.incremental_forward) and from
the engine that gathers requests (scorers.incremental) because the arithmetic of what is reused
is what every equality with a full recompute rests on, and it runs no model.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from scorers.kv_cache import Chain, Prefix, SideCache, cut_chain
from scorers.scoring_model import ScoringModel


@dataclass(eq=False)
class Row:
    """Tokens ids[start:] to run on top of `chain` (which covers ids[:start])."""

    sm: ScoringModel
    side: SideCache
    ids: np.ndarray
    start: int
    chain: Chain
    head: torch.Tensor
    """logp of ids[:start + 1], known before the forward (float64, CPU)."""
    gen: int
    base: Prefix | None
    rollback: bool
    """The cached base had tokens past `start` that this row runs again (a seam changed)."""

    @property
    def n_new(self) -> int:
        return len(self.ids) - self.start


def plan_row(sm: ScoringModel, side: SideCache, ids: np.ndarray, gen: int) -> Row | None:
    """The cheapest row that produces a prefix for `ids`; None when it is already cached."""
    base, shared = side.best(ids)
    if base is None:
        return Row(sm, side, ids, 0, (), torch.zeros(1, dtype=torch.float64), gen, None, False)
    if shared == len(base):
        if shared == len(ids):
            return None
        # The base's next-token distribution scores the first new token: nothing is rerun.
        first = torch.tensor([base.next_logp[int(ids[shared])].item()], dtype=torch.float64)
        return Row(sm, side, ids, shared, base.chain, torch.cat([base.logp, first]), gen, base, False)
    # Rollback: keep the cache up to the last shared token, which runs again to predict the first differing one.
    start = shared - 1
    return Row(sm, side, ids, start, cut_chain(base.chain, start), base.logp[:shared].clone(), gen, base, True)


def plan_row_batches(rows: Sequence[Row], batch_size: int, max_batch_tokens: int, window: int | None) -> list[list[Row]]:
    """Greedy packing, longest past first, by the padded area rows * (max past + max new).

    A sliding-window model only gets multi-row batches narrower than its window: left-aligned
    pasts leave holes, and the window is measured in cache slots, so a wider stack could mask
    keys that are within the window in real positions.
    """
    order = sorted(rows, key=lambda r: (r.start, r.n_new), reverse=True)
    batches: list[list[Row]] = []
    current: list[Row] = []
    past = new = 0
    for r in order:
        p, n = max(past, r.start), max(new, r.n_new)
        fits = (
            len(current) + 1 <= batch_size
            and (len(current) + 1) * (p + n) <= max_batch_tokens
            and (window is None or p + n <= window)
        )
        if current and not fits:
            batches.append(current)
            current, p, n = [], r.start, r.n_new
        current.append(r)
        past, new = p, n
    if current:
        batches.append(current)
    return batches
