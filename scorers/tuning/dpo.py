"""DPO with TRL and a LoRA adapter: the tuned side of the guide as a small delta on its parent.

LoRA because the guide is "tuned model vs untuned parent": with the adapter disabled the model
*is* the parent, so TRL's reference model costs no second copy, and only the delta is saved.
CPU, float32 (the CPU has no fast half precision), no gradient checkpointing (a 135M model's
activations fit easily, and recomputing them would cost a third more time).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from scorers.tuning.pairs import PreferencePair, TrainPair
from scorers.tuning.settings import TrainSettings

log = logging.getLogger(__name__)


@dataclass
class DpoReport:
    pairs: int
    steps: int
    wall_s: float
    losses: list[float] = field(default_factory=list)
    """The DPO loss of every step's batch, in order."""
    accuracies: list[float] = field(default_factory=list)
    """Share of each step's pairs whose chosen side the policy already prefers (TRL's rewards/accuracies)."""

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def mean_loss(self, part: slice) -> float | None:
        """Mean over a slice of steps: single steps are noisy with batches of a few pairs."""
        chunk = self.losses[part]
        return sum(chunk) / len(chunk) if chunk else None


def make_trainable(model: PreTrainedModel) -> None:
    """Let the Trainer take a model loaded from a GGUF file whose weights were dequantized.

    transformers dequantizes GGUF blocks into ordinary float tensors where it has no GGUF kernel
    (as on CPU) but keeps the quantizer attached, and the Trainer refuses any model that carries
    one. Only that case is unmarked; weights still held in quantized blocks stay refused.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = str(getattr(quantizer.quantization_config, "quant_method", ""))
    plain = all(p.dtype.is_floating_point and type(p) is torch.nn.Parameter for p in model.parameters())
    if "gguf" not in method.lower() or not plain:
        raise ValueError(f"cannot train a model whose weights are quantized ({method}); load it in float precision")
    model.hf_quantizer = None
    model.is_quantized = False  # type: ignore[misc]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def train_dpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair | TrainPair],
    settings: TrainSettings,
    *,
    device: str = "cpu",
) -> tuple[PreTrainedModel, DpoReport]:
    """The model wrapped with a trained LoRA adapter (a peft PeftModel), and how training went.

    `device` "cuda" trains on the GPU the model was loaded on (fp32 still); "cpu" is the default."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("no preference pairs to train on (lower --min-gap or sample more prompts)")
    used = list(pairs[: settings.max_pairs] if settings.max_pairs is not None else pairs)
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in used])
    make_trainable(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    set_seed(settings.seed)  # the LoRA matrices are initialised before the Trainer seeds anything
    with tempfile.TemporaryDirectory(prefix="w2s-dpo-") as work:
        args = DPOConfig(
            output_dir=work, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=1, learning_rate=settings.learning_rate, lr_scheduler_type="linear",
            warmup_steps=settings.warmup_ratio, beta=settings.beta, max_length=settings.max_length,
            seed=settings.seed, data_seed=settings.seed, use_cpu=device == "cpu", bf16=False, fp16=False,
            gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_pin_memory=False, remove_unused_columns=False,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    history = [h for h in trainer.state.log_history if "loss" in h]
    report = DpoReport(
        pairs=len(used), steps=int(trainer.state.global_step), wall_s=wall,
        losses=[float(h["loss"]) for h in history],
        accuracies=[float(h["rewards/accuracies"]) for h in history if "rewards/accuracies" in h],
    )
    log.info("DPO: %d pairs, %d steps, %.0f s, loss %s -> %s", report.pairs, report.steps, wall,
             report.first_loss, report.last_loss)
    peft_model = trainer.model
    peft_model.eval()
    return peft_model, report


def save_adapter(peft_model: PreTrainedModel, directory: Path, *, base_model: str) -> None:
    """Only the adapter (safetensors) and its config, with `base_model` as a portable label.

    peft records the local path the parent was loaded from; a shipped adapter says which model
    it belongs on instead. peft's generated model card carries nothing a user needs: dropped.
    (Safetensors are written readable by their owner only; package data must be readable by all.)
    """
    directory.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)
    (directory / "adapter_model.safetensors").chmod(0o644)  # written owner-only; it ships as package data
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
