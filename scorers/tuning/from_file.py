"""`w2s tune --preferences FILE`: DPO on the user's own preference pairs, no sampling, no judge.

The command layer (proxy.tune_preferences) reads and validates the file, splits off the held-out
prompts and hands plain pairs here; this module loads the model, renders chat-form prompts with
the model's own chat template, trains the LoRA adapter (scorers.tuning.dpo) and saves it. Nothing
here reads preference files (proxy.preferences is above scorers/).

A prompt is a string (used as the text itself, TRL's standard form) or a message list, rendered
with `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`: the text the model
answers after. A model with no chat template cannot render one, and guessing a format would train
the adapter on a layout nothing serves, so that is an error naming the model (give string prompts
instead), raised before any training.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from proxy.config import ModelSpec
from scorers.tuning.pairs import TrainPair
from scorers.tuning.settings import TrainSettings

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[Mapping[str, str]]]


class ChatTemplateMissing(ValueError):
    """Chat-form pairs for a model whose tokenizer has no chat template."""


@dataclass(frozen=True)
class FileTuneSettings:
    """What decides an adapter trained from a preference file; recorded whole in its tune.json."""

    train: TrainSettings = field(default_factory=TrainSettings)
    holdout_fraction: float = 0.1
    """Share of the file's distinct prompts kept out of training (all pairs of a prompt go one way)."""
    torch_threads: int | None = 1
    device: str = "auto"
    """"auto": CUDA when torch sees a GPU, else the CPU (fp32 on both)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu or cuda")
    return name


def render_prompt(tokenizer: Any, prompt: Prompt, model_label: str) -> str:
    """The prompt as the model reads it: a string as is, messages through its chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateMissing(
            f"{model_label} has no chat template, so chat-form pairs (message lists) cannot be rendered for it; "
            "use a chat model, or write the prompts as strings (`prompt`, `chosen`, `rejected` as text)")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def render_pairs(tokenizer: Any, pairs: Sequence[tuple[Prompt, str, str]], model_label: str) -> list[TrainPair]:
    rendered: dict[object, str] = {}
    out = []
    for prompt, chosen, rejected in pairs:
        key = prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)
        if key not in rendered:
            rendered[key] = render_prompt(tokenizer, prompt, model_label)
        out.append(TrainPair(rendered[key], chosen, rejected))
    return out


def dpo_record(report: Any) -> dict[str, Any]:
    """The DPO part of tune.json (shared with the film-review run)."""
    n = len(report.losses)
    tenth = max(1, n // 10)
    return {"steps": report.steps, "loss_first": report.first_loss, "loss_last": report.last_loss,
            "loss_mean_first_tenth": report.mean_loss(slice(0, tenth)),
            "loss_mean_last_tenth": report.mean_loss(slice(n - tenth, n)),
            "loss_curve": [round(x, 4) for x in report.losses],
            "accuracy_curve": [round(x, 3) for x in report.accuracies]}


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__}


def tune_on_pairs(
    spec: ModelSpec,
    output: Path,
    settings: FileTuneSettings,
    *,
    model_label: str,
    train: Sequence[tuple[Prompt, str, str]],
    heldout: Sequence[tuple[Prompt, str, str]] = (),
) -> tuple[dict[str, Any], list[str]]:
    """Train an adapter for `spec` on `train` and save it (adapter files only) into `output`.

    Returns the record's training part and the held-out prompts rendered as the model reads them
    (for the held-out check, which scores them as raw text). Chat-form prompts on a model with
    no chat template raise ChatTemplateMissing before any training.
    """
    import torch

    from scorers.loading import load_causal_lm
    from scorers.tuning.dpo import save_adapter, train_dpo

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(spec, torch.device(device), torch.float32)
    loaded = time.perf_counter()
    pairs = render_pairs(tokenizer, train, model_label)
    heldout_prompts = [p.prompt for p in render_pairs(tokenizer, heldout, model_label)]
    peft_model, report = train_dpo(model, tokenizer, pairs, settings.train, device=device)
    save_adapter(peft_model, output, base_model=model_label)
    done = time.perf_counter()
    log.info("trained on %d pairs in %.0f s", report.pairs, done - loaded)
    record = {"device": device, "dpo": dpo_record(report), "pairs_used": report.pairs,
              "wall_s": {"load": round(loaded - started, 1), "training": round(done - loaded, 1)},
              "versions": versions()}
    return record, heldout_prompts
