"""The `w2s` command."""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from proxy.alpaca_eval import cli as alpaca_eval_command
from proxy.config import ConfigError
from proxy.config.scorer import ModelPathMissing
from proxy.engine import ScorerUnavailable
from proxy.demo import command as demo_command
from proxy.demo import quickstart as quickstart_command
from proxy.local import command as serve_local_command
from proxy.logs import LOG_FORMATS, setup_logging
from proxy.presets import describe_presets, load_config
from proxy.search_flags import add_search_flags, search_overrides
from proxy.serving import command as serve_command
from proxy.serving.errors import upstream_error
from proxy.upstreams.errors import UpstreamError
from scorers.base import ScorerFailure
from proxy.film_reviews import tune_command
from proxy import guide_check_command


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
SUBCOMMANDS = (demo_command, quickstart_command, serve_local_command, serve_command, alpaca_eval_command,
               tune_command, guide_check_command)


def version() -> str:
    """The installed distribution's version (pyproject.toml's), or "unknown" from a bare source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("w2s-proxy")
    except PackageNotFoundError:
        return "unknown"


async def _presets(args: argparse.Namespace) -> int:
    print(describe_presets(), end="")
    return 0


def _common_flags(parser: argparse.ArgumentParser, *, after: bool) -> None:
    """-v/-q/--log-format, before the subcommand (`after` False) and after it: a subcommand's
    copies write their own dests with no default, so they never reset what came before."""
    suffix = "_after" if after else ""
    parser.add_argument("-v", "--verbose", action="count", dest="verbose" + suffix,
                        default=argparse.SUPPRESS if after else 0, help="more log lines (-vv: debug, library warnings)")
    parser.add_argument("-q", "--quiet", action="count", dest="quiet" + suffix,
                        default=argparse.SUPPRESS if after else 0, help="errors only")
    parser.add_argument("--log-format", choices=LOG_FORMATS, dest="log_format" + suffix,
                        default=argparse.SUPPRESS if after else "text",
                        help="log lines as text (default) or JSON, one object a line")


def _each_subcommand(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_each_subcommand(child)]
    return found


def _merge_common(args: argparse.Namespace) -> argparse.Namespace:
    args.verbose = args.verbose + getattr(args, "verbose_after", 0) - args.quiet - getattr(args, "quiet_after", 0)
    args.log_format = getattr(args, "log_format_after", args.log_format)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w2s", description="Weak-to-strong search over black-box LLM APIs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    _common_flags(parser, after=False)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="one guided answer")
    gen.add_argument("--config", required=True, help="config file or preset name under configs/")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is (no instruction template)")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")
    gen.add_argument("--trace", help="write the search tree to this HTML file")
    add_search_flags(gen)
    gen.set_defaults(func=_generate)
    listing = sub.add_parser("presets", help="list the presets config files may name, and what each is")
    listing.set_defaults(func=_presets)
    for command in SUBCOMMANDS:
        command.register(sub)
    for child in _each_subcommand(parser):
        _common_flags(child, after=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _merge_common(parser.parse_args(argv))
    setup_logging(args.verbose, args.log_format)
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
            url = e.url if isinstance(e, UpstreamError) and e.kind in ("connection", "timeout") else None
            where = f" ({url})" if url else ""
            print(f"w2s: error: {known.body.error.message.removesuffix('.')}{where}. Check upstream.base_url, "
                  "upstream.model and the key in the variable upstream.api_key_env names.", file=sys.stderr)
            return 1
        if isinstance(e, ModelPathMissing) or isinstance(e.__cause__, ModelPathMissing):
            print(f"w2s: error: {e if isinstance(e, ModelPathMissing) else e.__cause__}", file=sys.stderr)
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
