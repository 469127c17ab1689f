"""One `w2s tune` run: sample, label, pair, train, save, check; every number kept in tune.json."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxy.config import ModelSpec
from scorers.tuning.from_file import dpo_record, versions
from scorers.tuning.pairs import PreferencePair, read_pairs, select_pairs, write_pairs
from scorers.tuning.settings import TuneSettings

log = logging.getLogger(__name__)

Judge = Callable[[str], float]


def split_openings(openings: Sequence[str], prompts: int, holdout: int) -> tuple[list[str], list[str]]:
    """(training openings, held-out openings): the hold-out is the tail, never trained on."""
    if holdout >= len(openings):
        raise ValueError(f"holdout {holdout} leaves none of the {len(openings)} openings to train on")
    cut = len(openings) - holdout
    return list(openings[:min(prompts, cut)]), list(openings[cut:])


def make_pairs(
    model: Any, tokenizer: Any, prompts: Sequence[str], settings: TuneSettings, judge: Judge
) -> list[PreferencePair]:
    from scorers.tuning.sampling import sample_continuations

    s = settings.sampling
    samples = sample_continuations(model, tokenizer, prompts, k=s.samples_per_prompt, max_new_tokens=s.max_new_tokens,
                                   temperature=s.temperature, top_p=s.top_p, seed=s.seed, batch_size=s.batch_size)
    scores = [[judge(t) for t in texts] for texts in samples]
    return select_pairs(prompts, samples, scores, s.min_gap)


def run_tune(
    spec: ModelSpec,
    output: Path,
    settings: TuneSettings,
    *,
    model_label: str,
    judge: Judge,
    openings: Sequence[str],
    pairs_file: Path | None = None,
    check_judges: dict[str, Judge] | None = None,
) -> dict[str, Any]:
    """Train and save an adapter for `spec` into `output`; returns what tune.json records.

    `pairs_file` (default output/pairs.jsonl) is reused when it was made with the same sampling
    settings and model, so retraining with other DPO settings skips the slow sampling.
    `check_judges` (default: none) run the held-out check on the last `holdout` openings.
    """
    import torch

    from scorers.loading import load_causal_lm
    from scorers.tuning.dpo import save_adapter, train_dpo

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    s = settings.sampling
    train_prompts, heldout = split_openings(openings, s.prompts, s.holdout)
    model, tokenizer = load_causal_lm(spec, torch.device("cpu"), torch.float32)
    loaded = time.perf_counter()

    pairs_path = pairs_file or output / "pairs.jsonl"
    meta = s.key(model_label)
    pairs = read_pairs(pairs_path, meta)
    reused = pairs is not None
    if pairs is None:
        pairs = make_pairs(model, tokenizer, train_prompts, settings, judge)
        write_pairs(pairs_path, pairs, meta)
    sampled = time.perf_counter()
    log.info("%d pairs from %d openings (%s)", len(pairs), len(train_prompts), "reused" if reused else "sampled")

    peft_model, report = train_dpo(model, tokenizer, pairs, settings.train)
    save_adapter(peft_model, output, base_model=model_label)
    trained = time.perf_counter()

    check = None
    if check_judges and heldout:
        from scorers.tuning.check import heldout_check

        check = heldout_check(peft_model, tokenizer, heldout, check_judges, k=s.samples_per_prompt,
                              max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=s.seed + 1,
                              batch_size=s.batch_size)
    done = time.perf_counter()
    record: dict[str, Any] = {
        "base_model": model_label,
        "settings": settings.as_dict(),
        "seed": s.seed,
        "openings": {"trained_on": len(train_prompts), "held_out": len(heldout)},
        "pairs": {"count": len(pairs), "used": report.pairs, "reused_file": reused,
                  "mean_gap": round(sum(p.gap for p in pairs) / len(pairs), 4) if pairs else None},
        "dpo": dpo_record(report),
        "wall_s": {"load": round(loaded - started, 1), "sampling": round(sampled - loaded, 1),
                   "training": round(trained - sampled, 1), "check": round(done - trained, 1),
                   "total": round(done - started, 1)},
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "torch_threads": settings.torch_threads,
        "heldout_check": check,
        "versions": versions(),
    }
    (output / "tune.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
