"""Builds the scorer a config names; imports torch only when a scorer is really wanted."""
from __future__ import annotations

from proxy.config import ScorerConfig
from scorers.base import Scorer


def load_scorer(cfg: ScorerConfig) -> Scorer:
    """Loads model weights: slow, call it off the event loop."""
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if cfg.kind == "implicit":
        from scorers.implicit import ImplicitRewardScorer

        return ImplicitRewardScorer.from_config(cfg)
    raise ValueError(f"scorer.kind: unknown kind {cfg.kind!r}")
