"""The search-override flags every command that runs searches offers (`w2s generate`,
`w2s alpaca-eval`): one definition, so the flags and their config keys cannot drift apart."""
from __future__ import annotations

import argparse

_KEYS = ("w", "k", "l", "max_new_tokens", "temperature", "top_p", "seed", "prefer_finished",
         "narrow_start", "max_upstream_tokens", "max_cost_usd", "deadline_s")


def add_search_flags(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--narrow-start", action="store_const", const=True, default=None,
                   help="draw K first chunks from the prompt instead of the paper's W*K (saves (W-1)*K chunks)")
    g.add_argument("--max-upstream-tokens", type=int, metavar="N",
                   help="each search stops before a step that could be billed more than N tokens in all")
    g.add_argument("--search-max-cost-usd", dest="max_cost_usd", type=float, metavar="USD",
                   help="each search stops before a step that could cost more than USD in all")
    g.add_argument("--deadline-s", type=float, metavar="S",
                   help="each search answers with its best beam so far after S seconds")


def search_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The search fields the command line set, as `load_config` overrides."""
    return {k: getattr(args, k) for k in _KEYS if getattr(args, k) is not None}
