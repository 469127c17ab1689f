"""Everything that decides what `w2s tune` produces, in one record that travels with the adapter.

The defaults are the ones that built the shipped adapter; a user who changes one can read in the
adapter's tune.json what differs. Sampling settings are kept apart from training ones because
the pairs file is reused whenever they match: resampling is the slow half of a run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingSettings:
    """How the preference pairs are made from the small model's own continuations."""

    prompts: int = 310
    """Training openings sampled (from the front of TRAIN_OPENINGS); each gives at most one pair."""
    holdout: int = 50
    """Openings at the end of TRAIN_OPENINGS never trained on; the post-training check uses them."""
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    min_gap: float = 0.5
    """Smallest judge-score gap between chosen and rejected: closer pairs are mostly judge noise."""
    judge: str = "vader"
    seed: int = 0
    batch_size: int = 64
    """Sequences generated together (prompts x samples); a bigger batch is faster per token on CPU."""

    def key(self, model: str) -> dict[str, Any]:
        """What a reusable pairs file must have been made with (batch size changes the draws)."""
        return {"model": model, **asdict(self)}


@dataclass(frozen=True)
class TrainSettings:
    """DPO with a LoRA adapter, sized so that a whole run fits ~25 minutes on 2 CPU cores."""

    steps: int = 32
    batch_size: int = 8
    learning_rate: float = 2e-3
    beta: float = 0.1
    warmup_ratio: float = 0.0
    """LoRA starts as the identity (B = 0), so there is no early instability to warm up through,
    and a linear warmup's first step at learning rate 0 would be a whole step wasted."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_pairs: int | None = None
    """Train on at most this many pairs (the first ones); None = all that passed the gap."""
    max_length: int = 128
    seed: int = 0


@dataclass(frozen=True)
class TuneSettings:
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    torch_threads: int | None = 1
    """One thread: on a machine whose cores other work shares, two threads spent three times the
    CPU and took twice the wall time of one (OpenMP threads waiting on each other). Raise it on
    idle cores."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
