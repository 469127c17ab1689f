"""Batch planning shared by the local scorers and the remote one; no torch, so a remote scorer
(which imports it) runs on an install without the local extra."""
from __future__ import annotations

from collections.abc import Sequence


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int, *, max_width: int | None = None
) -> list[list[int]]:
    """Group sequence indices, longest first, so that no batch exceeds either limit once padded.

    Sorting by length keeps padding small; a single sequence longer than `max_batch_tokens`
    (or `max_width`) still gets a batch of its own, since it cannot be split.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Longest first: the batch's padded width is its first member's length.
        width = lengths[current[0]] if current else lengths[i]
        too_wide = max_width is not None and width > max_width
        if current and (len(current) + 1 > batch_size or (len(current) + 1) * width > max_batch_tokens or too_wide):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
