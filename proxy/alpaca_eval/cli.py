"""`w2s alpaca-eval` (generate) and `w2s alpaca-eval merge` (join shards).

Exit status: 0 when the output is complete, 1 when some items failed (running the same command
again retries exactly those; it mends only the retryable ones, and the message says which are
permanent), 2 for a bad config or argument.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from proxy.config import ConfigError, upstream_api_key
from proxy.search import require_scorer
from proxy.presets import load_config
from proxy.search_flags import add_search_flags, search_overrides


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file or preset name under configs/ (e.g. paper-cbs-w2k2l30)")
    p.add_argument("--output", help="output directory: checkpoint.jsonl, model_outputs.json, summary.json")
    p.add_argument("--instructions", metavar="FILE",
                   help="JSON list or JSONL of {instruction, dataset} (default: the Hugging Face dataset "
                        "tatsu-lab/alpaca_eval, alpaca_eval_gpt4_baseline, split eval)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N instructions")
    p.add_argument("--shard", metavar="i/n", help="the i-th of n contiguous parts (1-based), after --limit")
    p.add_argument("--concurrency", type=int, default=8, metavar="C", help="instructions in flight (default 8)")
    p.add_argument("--max-cost-usd", dest="run_max_cost_usd", type=float, metavar="USD",
                   help="stop starting items once this run has spent USD upstream (at the upstream's prices); "
                        "items it cut short are failed and redone by the next run")
    p.add_argument("--generator", help="generator name in the output (default: model_guidance_wkl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--on-too-long", choices=("fail", "unguided", "truncate-left"), default="fail",
                   help="an instruction that does not fit the guide's context: fail (default; a permanent "
                        "failure), unguided (answer it by plain sampling, marked), truncate-left (cut it from "
                        "the left to fit the guide, marked); a policy other than fail is named in the generator")
    add_search_flags(p)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("alpaca-eval", help="AlpacaEval 2.0 answers for every instruction (resumable)",
                              description="Generate AlpacaEval 2.0 model outputs; `merge` joins shards.")
    _add_run_flags(p)
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="alpaca_eval_action", metavar="{merge}")
    m = sub.add_parser("merge", help="join shard directories into one model_outputs.json")
    m.add_argument("--output", required=True, help="directory for the merged model_outputs.json")
    m.add_argument("--instructions", metavar="FILE", help="also check the merged list against this dataset file")
    m.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="--output directories of the shard runs")
    m.set_defaults(func=_merge)


async def _run(args: argparse.Namespace) -> int:
    from proxy.alpaca_eval.dataset import HUB_CONFIG, HUB_REPO, load_instructions, parse_shard, select
    from proxy.alpaca_eval.identity import generator_name
    from proxy.alpaca_eval.runner import preflight, run_alpaca_eval
    from proxy.client import GuidedClient

    if not args.config or not args.output:
        raise ConfigError("alpaca-eval: --config and --output are required")
    if args.concurrency < 1:
        raise ConfigError("--concurrency: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit: must be at least 1")
    cfg = load_config(args.config, **search_overrides(args))
    upstream_api_key(cfg.upstream)  # a missing key fails now, not after the dataset and the models load
    require_scorer(cfg.search, cfg.scorer is not None)
    shard = parse_shard(args.shard) if args.shard else None
    if args.instructions is None:
        print(f"w2s alpaca-eval: fetching {HUB_REPO} ({HUB_CONFIG}) from the Hugging Face hub "
              "(--instructions FILE uses a local copy)", file=sys.stderr)
    items, source = await asyncio.to_thread(load_instructions, args.instructions)
    selection = select(items, source, limit=args.limit, shard=shard)
    preflight(args.output, cfg, selection, args.generator or generator_name(cfg, on_too_long=args.on_too_long),
              args.on_too_long)
    async with GuidedClient(cfg) as client:
        summary = await run_alpaca_eval(client, selection, args.output, concurrency=args.concurrency,
                                        max_cost_usd=args.run_max_cost_usd,
                                        generator=args.generator, progress=not args.no_progress,
                                        on_too_long=args.on_too_long)
    print(json.dumps(summary.model_dump(), indent=2))
    if summary.complete:
        print(f"judge with:\n  {summary.alpaca_eval_command}", file=sys.stderr)
        return 0
    _report_failures(summary)
    return 1


def _report_failures(summary: Any) -> None:
    """Retryable failures: run again. Permanent ones: never "retry"; what would change them."""
    retry = summary.failed - summary.permanent_failures
    if retry:
        print(f"w2s alpaca-eval: {retry} of {summary.items} items failed; run the same command again "
              "to retry them", file=sys.stderr)
    if summary.permanent_failures:
        permanent = [f.index for f in summary.failures if f.permanent]
        shown = ", ".join(map(str, permanent[:20])) + (", ..." if len(permanent) > 20 else "")
        too_long = [f.index for f in summary.failures if f.permanent and f.error and "ScorerContextError" in f.error]
        print(f"w2s alpaca-eval: {summary.permanent_failures} of {summary.items} items failed permanently "
              f"(running again cannot mend them; errors in summary.json): items {shown}", file=sys.stderr)
        if too_long:
            print(f"  {len(too_long)} do not fit the guide's context (--on-too-long {summary.on_too_long}): "
                  "--on-too-long unguided answers them by plain sampling, --on-too-long truncate-left cuts "
                  "them from the left; either is named in the generator and marked per item", file=sys.stderr)
    if summary.partial_outputs:
        print(f"  the {summary.done} answered items: {summary.partial_outputs} (a partial run: its win rate "
              "is not comparable to a full one)", file=sys.stderr)


async def _merge(args: argparse.Namespace) -> int:
    from proxy.alpaca_eval.dataset import read_instruction_file
    from proxy.alpaca_eval.merge import merge_shards

    instructions = read_instruction_file(args.instructions) if args.instructions else None
    summary = merge_shards(args.shards, args.output, instructions=instructions)
    print(json.dumps(summary.model_dump(), indent=2))
    print(f"judge with:\n  {summary.alpaca_eval_command}", file=sys.stderr)
    return 0
