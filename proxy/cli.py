"""The `w2s` command."""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from proxy.alpaca_eval import cli as alpaca_eval_command
from proxy.config import ConfigError
from proxy.engine import ScorerUnavailable
from proxy.demo import command as demo_command
from proxy.local import command as serve_local_command
from proxy.presets import load_config
from proxy.search_flags import add_search_flags, search_overrides
from proxy.serving import command as serve_command
from proxy.serving.errors import upstream_error
from scorers.base import ScorerFailure
from proxy.film_reviews import tune_command


async def _generate(args: argparse.Namespace) -> int:
    from proxy.client import GuidedClient

    cfg = load_config(args.config, **search_overrides(args))
    async with GuidedClient(cfg) as client:
        if args.raw:
            result = await client.complete(args.prompt)
        else:
            result = await client.instruct(args.prompt)
    summary = client.summarize(result)
    if args.trace:
        from proxy.demo.trace_html import TracedSearch, render_trace

        Path(args.trace).write_text(render_trace([TracedSearch(result.mode, args.prompt, result)]))
    if args.json:
        print(json.dumps({"text": result.text, **asdict(summary)}, indent=2))
        return 0
    score = "n/a" if summary.score is None else f"{summary.score:.4f}"
    print(result.text.strip())
    print()
    print(f"mode {summary.mode}  score {score}  finished {'yes' if summary.finished else 'no'}  "
          f"steps {summary.steps}  upstream calls {summary.upstream_calls}  "
          f"upstream tokens {summary.prompt_tokens} prompt ({summary.cached_tokens} cached, "
          f"{summary.cache_write_tokens} cache writes) + {summary.completion_tokens} completion  "
          f"cost ${summary.cost_usd:.6f}  wall {summary.wall_s}s"
          + (f"  stopped by {summary.stopped_by}" if summary.stopped_by else ""))
    return 0


# Each module adds its own subcommand(s) with `register(subparsers)`; its handler is an
# `async def (args) -> int` stored as `func`. Modules must not import torch at import time.
SUBCOMMANDS = (demo_command, serve_local_command, serve_command, alpaca_eval_command, tune_command)


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
    add_search_flags(gen)
    gen.set_defaults(func=_generate)
    for command in SUBCOMMANDS:
        command.register(sub)
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
    except Exception as e:  # noqa: BLE001 - what a user can act on, not a traceback
        known = upstream_error(e)
        if known is not None:  # the upstream's own message is not repeated: it may echo the key
            print(f"w2s: error: {known.body.error.message} Check upstream.base_url, upstream.model and "
                  "the key in the variable upstream.api_key_env names.", file=sys.stderr)
            return 1
        if isinstance(e, (ScorerUnavailable, ScorerFailure)):  # the cause is the user's own (paths, engines)
            loading = isinstance(e, ScorerUnavailable) and e.__cause__ is not None
            print(f"w2s: error: {f'the scorer failed to load: {e.__cause__}' if loading else e}", file=sys.stderr)
            return 1
        if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
            print(f"w2s: error: cannot listen: {e.strerror} (is another server on that port? try --port)",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
