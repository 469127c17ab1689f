"""Builds the scorer a config names; imports torch only when a scorer is really wanted."""
from __future__ import annotations

import asyncio
import importlib.util

from proxy.config import ScorerConfig
from proxy.config.extras import require_scorer_extra
from scorers.base import Scorer


def load_scorer(cfg: ScorerConfig) -> Scorer:
    """Loads model weights (a remote scorer: tokenizers): slow, call it off the event loop; a
    scorer serves only after `start()` (open_scorer does both). Changes nothing process-wide
    (torch's thread pool is the process owner's: proxy.engine, serve-local, the benchmarks)."""
    require_scorer_extra(cfg.kind)  # MissingExtra names the extra a light install lacks
    if cfg.kind == "implicit":
        from scorers.implicit import ImplicitRewardScorer

        return ImplicitRewardScorer.from_config(cfg)
    if cfg.kind == "remote":
        from scorers.remote import RemoteScorer

        return RemoteScorer.from_config(cfg)
    raise ValueError(f"scorer.kind: unknown kind {cfg.kind!r}")


async def open_scorer(cfg: ScorerConfig) -> Scorer:
    """A scorer ready to serve: loaded on a worker thread, then started (a remote scorer asks its
    engines what they serve); closed again if starting fails, so nothing is left open."""
    scorer = await asyncio.to_thread(load_scorer, cfg)
    try:
        await scorer.start()
    except BaseException:
        await scorer.aclose()
        raise
    return scorer


def set_torch_threads(threads: int | None) -> None:
    """torch's CPU thread pool for the whole process (None: leave torch's default). Only whoever
    owns the process's models calls this, once, before loading them."""
    if threads is None or importlib.util.find_spec("torch") is None:  # no torch (a remote scorer): no pool
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
