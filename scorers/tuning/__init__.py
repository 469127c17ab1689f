"""Tuning a guide the paper's way: DPO on the small model's own answers, labelled by a judge.

The guide is then the tuned model against its untuned parent. Training keeps only a LoRA
adapter, small enough to ship as package data; `ModelSpec(adapter=...)` merges it at load.
Nothing here imports torch at package level, nor anything of proxy/ but proxy.config: the
`w2s tune` command and its film-review recipe live in proxy.film_reviews.tune_command, and
training on a user's preference file (read in proxy.tune_preferences, trained here by
scorers.tuning.from_file) shares the same DPO.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED_ADAPTER = "smollm2-135m-film-dpo"
"""The adapter `w2s tune` builds with its defaults: SmolLM2-135M-Instruct tuned towards positive
continuations of film-review openings (VADER-labelled pairs)."""


def shipped_adapter_path(name: str = SHIPPED_ADAPTER) -> Path:
    """Directory of a shipped adapter, for `ModelSpec(adapter=str(...))` over its parent model.

    Package data, so it is found the same way from a checkout and from an installed wheel.
    """
    path = Path(str(resources.files("scorers") / "adapters" / name))
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no shipped adapter {name!r} at {path} (build it with `w2s tune`)")
    return path
