"""`w2s guide-check`: a guide's accuracy on a held-out preference file, as a table and as JSON.

The scorer is any the config can describe: a scorer preset (`zephyr-7b-beta`), a whole-config
preset or a YAML file (its `scorer:` section, or a bare scorer mapping), or one of the film-review
guides (`film-review:tuned`, the shipped DPO adapter; `film-review:contrast`, the prompt contrast);
`--adapter` and `--expo-alpha` refine it. Nothing here imports torch at import time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from proxy.config import ConfigError, ScorerConfig, format_validation_error
from proxy.guide_check import GuideCheck, Rate, check_guide
from proxy.presets import preset_names, read_config, resolve_part
from proxy.preferences import read_pairs

FILM_REVIEW = "film-review:"
JUDGE_NAMES = ("vader", "textblob")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "guide-check", help="a guide's accuracy on held-out preference pairs (chosen vs rejected)",
        description="Scores each pair's chosen and rejected response with the guide (the search's own "
                    "incremental scorer, batched) and reports how often it prefers chosen, its margin, "
                    "the accuracy by prompt length and by response-length difference and, with --judge, "
                    "its agreement with a judge. See docs/tuning.md.")
    p.add_argument("--scorer", required=True,
                   help="scorer preset, whole-config preset, YAML file (its scorer: section or a bare scorer "
                        "mapping), or film-review:tuned / film-review:contrast")
    p.add_argument("--pairs", required=True, type=Path,
                   help="JSONL, one pair a line: prompt, chosen, rejected (strings or chat message lists)")
    p.add_argument("--judge", choices=JUDGE_NAMES, help="also correlate the guide with this judge of the responses")
    p.add_argument("--json", type=Path, help="write the numbers (and each pair's scores) to this file")
    p.add_argument("--limit", type=int, help="check only the first N pairs")
    p.add_argument("--adapter", help="a LoRA adapter directory for the tuned side (tuned.adapter)")
    p.add_argument("--expo-alpha", type=float, help="ExPO: tuned + alpha * (tuned - untuned)")
    p.add_argument("--batch", type=int, default=16, help="prompts scored at once (default 16)")
    p.set_defaults(func=guide_check_command)


def _validate(data: Any, where: str) -> ScorerConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a scorer mapping (tuned, untuned, ...)")
    try:
        return ScorerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "scorer")) from None


def resolve_scorer(value: str, *, adapter: str | None = None, expo_alpha: float | None = None) -> ScorerConfig:
    """The ScorerConfig `--scorer VALUE` names (see the module's doc), refined by the overrides."""
    if value.startswith(FILM_REVIEW):
        from proxy.film_reviews.guide_model import fetch_demo_model
        from proxy.film_reviews.guides import GUIDES, guide_config

        name = value.removeprefix(FILM_REVIEW)
        if name not in GUIDES:
            raise ConfigError(f"--scorer: unknown film-review guide {name!r} (known: {', '.join(GUIDES)})")
        data: Any = guide_config(name, fetch_demo_model()).model_dump(exclude_unset=True)
    elif value in preset_names("scorer"):
        data = resolve_part("scorer", value)
    else:
        config = read_config(value)  # a file, or a whole-config preset; unknown names list the presets
        section = config["scorer"] if "scorer" in config else config
        if section is None:
            raise ConfigError(f"{value}: no scorer (the config has no guide)")
        data = resolve_part("scorer", section)
    if isinstance(data, dict) and (adapter is not None or expo_alpha is not None):
        data = dict(data)
        if adapter is not None:
            data["tuned"] = {**(data.get("tuned") or {}), "adapter": adapter}
        if expo_alpha is not None:
            data["expo_alpha"] = expo_alpha
    return _validate(data, value)


def _progress(total: int, quiet: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(advance, close) of a progress bar on stderr: tqdm where installed, else a plain counter."""
    if quiet:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            print(f"\rscored {done[0]}/{total} pairs", end="", file=sys.stderr, flush=True)

        return advance, lambda: print(file=sys.stderr)
    bar = tqdm(total=total, unit="pair", desc="scoring", file=sys.stderr, mininterval=0.5)
    return bar.update, bar.close


def _num(x: float, fmt: str = "+.3f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def _ci(r: Rate) -> str:
    return f"{_num(r.rate, '.3f')} [{_num(r.low, '.3f')}, {_num(r.high, '.3f')}]"


def format_table(check: GuideCheck, title: str) -> str:
    """The check as aligned text lines."""
    labels = ["all pairs", *(b.label for b in [*check.by_prompt_length, *check.by_length_difference])]
    width = max(map(len, labels))
    head = f"{'':{width}}  {'n':>5}  {'accuracy [95% CI]':<24}  mean margin"
    rows = [title, "", head]

    def row(label: str, n: int, rate: Rate, margin: str) -> str:
        return f"{label:{width}}  {n:>5}  {_ci(rate):<24}  {margin}"

    m = check.margin
    rows.append(row("all pairs", check.pairs, check.accuracy, f"{_num(m.mean)} ± {_num(m.se, '.3f')}"))
    for section in (check.by_prompt_length, check.by_length_difference):
        rows.append("")
        rows += [row(b.label, b.accuracy.n, b.accuracy, _num(b.mean_margin)) for b in section]
    rows += ["", f"ties (scored equal, counted wrong): {check.ties}"
             + (f"; skipped (prompt over the guide's context): {check.skipped}" if check.skipped else ""),
             f"length: chosen is the longer answer in {_num(check.longer_chosen.rate, '.3f')} of pairs (what a "
             f"guide preferring longer answers scores); r(margin, length difference) {_num(check.length_r)}"]
    j = check.judge
    if j is not None:
        rows += [f"judge {j.name}: prefers chosen {_ci(j.judge_accuracy)} (n {j.judge_accuracy.n}); "
                 f"sign agreement with the guide {_ci(j.agreement)} (n {j.agreement.n})",
                 f"  within-prompt r {_num(j.within_prompt_r)} ({j.within_prompt_prompts} prompts); "
                 f"r(guide margin, judge margin) across pairs {_num(j.margin_r)}"]
    return "\n".join(rows)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def check_json(check: GuideCheck, **meta: Any) -> dict[str, Any]:
    """The check as a JSON-ready mapping (nan and inf as null), `meta` first."""
    data = asdict(check)
    data["margin"]["z"] = check.margin.z
    for score in data["scores"]:
        score["margin"] = score["chosen"] - score["rejected"]
    return _clean({**meta, **data})


async def guide_check_command(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit: must be at least 1")
    if args.batch < 1:
        raise ConfigError("--batch: must be at least 1")
    pairs = read_pairs(args.pairs, args.limit)  # a bad file fails before any model loads
    judge = None
    if args.judge:
        from proxy.config.extras import require

        require("demo", "vaderSentiment", "textblob", use="--judge")
        from proxy.film_reviews.judges import JUDGES

        judge = JUDGES[args.judge]
    cfg = resolve_scorer(args.scorer, adapter=args.adapter, expo_alpha=args.expo_alpha)
    from scorers.base import ScorerContextError
    from scorers.registry import open_scorer, set_torch_threads

    set_torch_threads(cfg.torch_threads)
    started = time.perf_counter()
    scorer = await open_scorer(cfg)
    loaded = time.perf_counter()
    advance, close = _progress(len(pairs), getattr(args, "verbose", 0) < 0)
    try:
        check = await check_guide(scorer, pairs, judge, judge_name=args.judge or "judge", batch=args.batch,
                                  progress=advance)
    except ScorerContextError as e:
        raise ConfigError(f"--pairs: {e}") from None
    finally:
        close()
        await scorer.aclose()
    scoring_s = round(time.perf_counter() - loaded, 2)
    prompts = len({s.prompt for s in check.scores})
    print(format_table(check, f"guide check: {check.pairs} pairs ({prompts} prompts) from {args.pairs}, "
                              f"scorer {args.scorer}; scored in {scoring_s}s"))
    if args.json:
        meta = {"scorer": args.scorer, "scorer_config": cfg.model_dump(mode="json", exclude_none=True),
                "pairs_file": str(args.pairs), "judge": args.judge, "load_s": round(loaded - started, 2),
                "scoring_s": scoring_s}
        args.json.write_text(json.dumps(check_json(check, **meta), indent=2) + "\n")
        print(f"\nwritten to {args.json}")
    return 0
