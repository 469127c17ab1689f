"""`w2s tune --preferences FILE`: a tuned guide from the user's own preference pairs.

The file is read and validated here (proxy.preferences) before any model loads; a bad line is a
PreferenceFileError naming it. Its distinct prompts are split, deterministically by the seed, into
training and held-out ones (every pair of a prompt goes one way, so the check never sees a prompt
trained on). scorers.tuning.from_file trains the LoRA adapter on the plain pairs; the held-out
check then scores the held-out pairs through the guide's own scorer path (proxy.guide_check), the
pair before training (parent against parent: every margin 0, a tie, which counts as wrong) and
after (parent + adapter against parent).

Everything is written into a temporary directory beside --output and renamed onto it at the end,
so a failed or interrupted run leaves nothing at --output (an earlier tune output there is replaced
only by a complete one). Nothing here imports torch at import time.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.config import ConfigError, ModelSpec
from proxy.guide_check import GuideCheck, check_guide, prompt_key
from proxy.preferences import PreferencePair, read_pairs


@contextlib.contextmanager
def atomic_output(output: Path) -> Iterator[Path]:
    """A fresh directory beside `output`, renamed onto it when the block completes; removed if not.

    An existing `output` is replaced only if it is empty or an earlier tune output (it has a
    tune.json or an adapter_config.json); anything else there is refused, untouched."""
    if output.exists():
        earlier = output.is_dir() and (not any(output.iterdir()) or (output / "tune.json").is_file()
                                       or (output / "adapter_config.json").is_file())
        if not earlier:
            raise ConfigError(f"--output: {output} exists and is not an earlier `w2s tune` output; not replacing it")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent))
    try:
        yield work
        work.chmod(0o755)  # mkdtemp makes it owner-only
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            work.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def split_by_prompt(pairs: Sequence[PreferencePair], fraction: float, seed: int
                    ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training, held-out) pairs: round(fraction x distinct prompts) prompts held out (at least one
    when fraction > 0, never all), drawn by `random.Random(seed)`; file order kept on each side."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"--holdout-fraction: {fraction} is not in [0, 1)")
    keys = list(dict.fromkeys(prompt_key(p.prompt) for p in pairs))
    held_count = min(max(1, round(fraction * len(keys))), len(keys) - 1) if fraction > 0 else 0
    order = list(keys)
    random.Random(seed).shuffle(order)
    held = set(order[:held_count])
    train = [p for p in pairs if prompt_key(p.prompt) not in held]
    return train, [p for p in pairs if prompt_key(p.prompt) in held]


def file_settings(args: argparse.Namespace) -> Any:
    from scorers.tuning.from_file import FileTuneSettings
    from scorers.tuning.settings import TrainSettings

    train = replace(TrainSettings(), steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    beta=args.beta, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, max_pairs=args.pairs,
                    seed=args.seed)
    return FileTuneSettings(train=train, holdout_fraction=args.holdout_fraction, torch_threads=args.threads,
                            device=args.device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _summary(check: GuideCheck) -> dict[str, Any]:
    a = check.accuracy
    return {"accuracy": round(a.rate, 4), "accuracy_95ci": [round(a.low, 4), round(a.high, 4)],
            "chosen_above_rejected": a.successes, "pairs": check.pairs, "ties": check.ties, "skipped": check.skipped,
            "margin_mean": round(check.margin.mean, 4), "margin_se": round(check.margin.se, 4)}


async def heldout_check(spec: ModelSpec, adapter: Path, heldout: Sequence[PreferencePair], prompts: Sequence[str],
                        device: str) -> dict[str, Any]:
    """The share of held-out pairs the guide scores chosen above rejected, before and after tuning.

    The prompts come rendered as the model read them in training (chat templates applied), so the
    sides score them as raw text."""
    from proxy.config import ScorerConfig
    from scorers.registry import open_scorer

    pairs = [replace(p, prompt=text) for p, text in zip(heldout, prompts)]
    parent = spec.model_copy(update={"chat_template": "raw", "system_prompt": None, "adapter": None})
    out: dict[str, Any] = {"pairs": len(pairs), "prompts": len({prompt_key(p.prompt) for p in heldout}),
                           "lines": [p.line for p in heldout]}
    for name, tuned in (("before", parent), ("after", parent.model_copy(update={"adapter": str(adapter)}))):
        scorer = await open_scorer(ScorerConfig(tuned=tuned, untuned=parent, device=device, dtype="float32"))
        try:
            out[name] = _summary(await check_guide(scorer, pairs))
        finally:
            await scorer.aclose()
    return out


async def tune_from_file(args: argparse.Namespace, spec: ModelSpec, label: str) -> dict[str, Any]:
    """The whole `--preferences` run; returns what tune.json records (written into --output)."""
    import asyncio
    import json

    path: Path = args.preferences
    pairs = read_pairs(path)  # a bad file fails here, before any model loads
    settings = file_settings(args)
    train, heldout = split_by_prompt(pairs, settings.holdout_fraction, args.seed)
    data = {"path": str(path.resolve()), "sha256": _sha256(path), "pairs": len(pairs),
            "prompts": len({prompt_key(p.prompt) for p in pairs}),
            "chat_form": sum(not isinstance(p.prompt, str) for p in pairs),
            "trained_on": {"pairs": len(train), "prompts": len({prompt_key(p.prompt) for p in train})},
            "held_out": {"pairs": len(heldout), "prompts": len({prompt_key(p.prompt) for p in heldout})}}
    from scorers.tuning.from_file import tune_on_pairs

    with atomic_output(args.output) as work:
        started = time.perf_counter()
        trained, prompts = await asyncio.to_thread(
            tune_on_pairs, spec, work, settings, model_label=label,
            train=[(p.prompt, p.chosen, p.rejected) for p in train],
            heldout=[(p.prompt, p.chosen, p.rejected) for p in heldout])
        checked = time.perf_counter()
        check = None
        if heldout and not args.no_check:
            check = await heldout_check(spec, work, heldout, prompts, trained["device"])
        trained["wall_s"]["check"] = round(time.perf_counter() - checked, 1)
        trained["wall_s"]["total"] = round(time.perf_counter() - started, 1)
        versions = trained.pop("versions")
        record = {"base_model": label, "data": data, "settings": settings.as_dict(), "seed": args.seed,
                  **trained, "heldout_check": check, "versions": versions}
        (work / "tune.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
