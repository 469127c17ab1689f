"""The `w2s` command."""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from proxy.config import ConfigError
from proxy.presets import load_config


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search overrides")
    g.add_argument("--w", type=int, help="beam width")
    g.add_argument("--k", type=int, help="successors per beam")
    g.add_argument("--l", type=int, help="chunk length (upstream tokens)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--prefer-finished", action="store_const", const=True, default=None,
                   help="answer with the best finished beam when there is one (default: the top-scored beam)")


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    keys = ("w", "k", "l", "max_new_tokens", "temperature", "top_p", "seed", "prefer_finished")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


async def _generate(args: argparse.Namespace) -> int:
    from proxy.client import GuidedClient

    cfg = load_config(args.config, **_overrides(args))
    async with GuidedClient(cfg) as client:
        if args.raw:
            result = await client.complete(args.prompt)
        else:
            result = await client.instruct(args.prompt)
    summary = client.summarize(result)
    if args.trace:
        from proxy.trace_html import TracedSearch, render_trace

        Path(args.trace).write_text(render_trace([TracedSearch(result.config.mode, args.prompt, result)]))
    if args.json:
        print(json.dumps({"text": result.text, **asdict(summary)}, indent=2))
        return 0
    score = "n/a" if summary.score is None else f"{summary.score:.4f}"
    print(result.text.strip())
    print()
    print(f"mode {summary.mode}  score {score}  finished {'yes' if summary.finished else 'no'}  "
          f"steps {summary.steps}  upstream calls {summary.upstream_calls}  "
          f"upstream tokens {summary.prompt_tokens} prompt + {summary.completion_tokens} completion  "
          f"cost ${summary.cost_usd:.6f}  wall {summary.wall_s}s")
    return 0


# Each module adds its own subcommand(s) with `register(subparsers)`; its handler is an
# `async def (args) -> int` stored as `func`. Modules must not import torch at import time.
SUBCOMMAND_MODULES: tuple[str, ...] = ("proxy.demo", "proxy.local_server", "proxy.serving.command", "proxy.alpaca_eval.cli",
                                      "scorers.tuning.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w2s", description="Weak-to-strong search over black-box LLM APIs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="one guided answer")
    gen.add_argument("--config", required=True, help="config file or preset name under configs/")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is (no instruction template)")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")
    gen.add_argument("--trace", help="write the search tree to this HTML file")
    _add_search_flags(gen)
    gen.set_defaults(func=_generate)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(args.func(args))
    except ConfigError as e:
        print(f"w2s: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
