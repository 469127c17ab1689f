"""`w2s demo`: weak-to-strong search on real models, offline, in a few minutes on a CPU.

The same design as benchmarks/quality.py, smaller: the black box is Gemma 3 270M, a base model
with a 262k-token vocabulary, served on 127.0.0.1 by the local completions server and reached
through the same OpenAI upstream code a paid API uses. It continues the openings of film
reviews. The guide is a SmolLM2-135M pair on another vocabulary (by default the tuned one: the
shipped DPO adapter against its parent, the paper's setting), which prefers positive reviews.
Two sentiment lexicons that never guide (VADER, which labelled the adapter's training pairs,
and TextBlob, which did not) judge the continuations. Base, best-of-N and CBS answer the same
openings with about the same upstream completion tokens, seeded, and the report says, in
standard errors, which differences this run can tell apart from noise.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from proxy.config import AppConfig, SearchConfig, Strict
from proxy.engine import Engine
from proxy.film_reviews.openings import TEST_OPENINGS
from proxy.film_reviews.stats import Estimate, estimate, paired
from proxy.search import SearchResult
from proxy.types import Conversation
from proxy.demo.offline import offline_pair
from proxy.demo.trace_html import TracedSearch, render_trace

Judge = Callable[[str], float]
NOISE_Z = 2.0
"""A difference under this many standard errors is reported as inside the noise."""


class DemoSettings(Strict):
    """The benchmark's design at a size that runs in about five minutes on 2 CPU cores.

    The defaults are the benchmark's best-supported comparison: CBS W4 K4 over four chunks of 4
    tokens against best-of-16. With the paper's start every step draws W*K = N chunks, so both
    draw the same completion tokens (CBS is billed more prompt tokens: each step re-sends the
    answer so far)."""

    openings: int = Field(12, ge=2, le=len(TEST_OPENINGS))
    guide: Literal["tuned", "contrast"] = "tuned"
    max_new_tokens: int = Field(16, ge=4)
    n: int = Field(16, ge=2, description="best-of-N samples")
    w: int = Field(4, ge=1)
    k: int = Field(4, ge=1)
    l: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    seed: int = 0

    def methods(self) -> list[tuple[str, SearchConfig]]:
        common = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        return [
            ("base", SearchConfig(w=1, k=1, **common)),
            (f"best-of-{self.n}", SearchConfig(w=1, k=self.n, **common)),
            (f"cbs w{self.w}k{self.k}l{self.l}", SearchConfig(w=self.w, k=self.k, l=self.l, **common)),
        ]


@dataclass
class DemoRow:
    opening_index: int
    opening: str
    method: str
    result: SearchResult
    judges: dict[str, float]


async def run_demo(settings: DemoSettings, engine: Engine, judges: Mapping[str, Judge]) -> list[DemoRow]:
    """Every opening under every method, all in flight together; rows in (opening, method) order.

    The upstream continues the opening as raw text, and the guide reads the same opening."""
    async def one(i: int, opening: str, method: str, cfg: SearchConfig) -> DemoRow:
        seeded = cfg.model_copy(update={"seed": settings.seed * 1000 + i})
        r = await engine.search(Conversation.completion(opening), seeded)
        return DemoRow(i, opening, method, r, {name: judge(r.text) for name, judge in judges.items()})

    openings = TEST_OPENINGS[: settings.openings]
    jobs = [one(i, o, name, cfg) for i, o in enumerate(openings) for name, cfg in settings.methods()]
    return list(await asyncio.gather(*jobs))


def _by_method(rows: Sequence[DemoRow], value: Callable[[DemoRow], float | None]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        v = value(r)
        if v is not None:
            out.setdefault(r.method, {})[r.opening_index] = v
    return out


def verdict(diff: Estimate) -> str:
    """A difference in words: how many standard errors, and whether that is more than noise."""
    z = diff.z
    if z != z:  # nan: no spread to judge by
        return "cannot tell (too few openings)"
    if abs(z) < NOISE_Z:
        return f"{z:+.1f} s.e.: inside the noise"
    return f"{z:+.1f} s.e.: {'better' if z > 0 else 'worse'}"


def format_report(rows: Sequence[DemoRow], width: int = 100) -> str:
    methods = list(dict.fromkeys(r.method for r in rows))
    judge_names = list(rows[0].judges) if rows else []
    out: list[str] = []
    for i in sorted({r.opening_index for r in rows}):
        group = [r for r in rows if r.opening_index == i]
        out.append(f"\n[{i + 1}] {group[0].opening} ...")
        for r in group:
            marks = "  ".join(f"{j} {v:+.2f}" for j, v in r.judges.items())
            score = "n/a" if r.result.score is None else f"{r.result.score:+.2f}"
            out.append(f"  {r.method:<14} guide {score:>6}  {marks}")
            body = " ".join(r.result.text.split()) or "(empty)"
            out.extend(textwrap.wrap(body, width=width, initial_indent="      ", subsequent_indent="      "))
    n = len({r.opening_index for r in rows})
    out.append(f"\nMeans over {n} openings, ± one standard error:")
    out.append(f"{'method':<14} {'guide score':>12} " + " ".join(f"{j:>15}" for j in judge_names)
               + f" {'tokens billed (completion)':>27}")
    guide = _by_method(rows, lambda r: r.result.score)
    tokens = _by_method(rows, lambda r: float(r.result.usage.completion_tokens))
    billed = _by_method(rows, lambda r: float(r.result.usage.prompt_tokens + r.result.usage.completion_tokens))
    per_judge = {j: _by_method(rows, lambda r, j=j: r.judges[j]) for j in judge_names}
    for m in methods:
        g = estimate(guide[m]).fmt(2) if m in guide else "n/a"
        judged = " ".join(f"{estimate(per_judge[j][m]).fmt(3):>15}" for j in judge_names)
        spent = f"{estimate(billed[m]).mean:.0f} ({estimate(tokens[m]).mean:.0f})"
        out.append(f"{m:<14} {g:>12} {judged} {spent:>27}")
    out.append("\nPaired on the same openings (difference ± s.e.; under "
               f"{NOISE_Z:.0f} s.e. is inside the noise):")
    pairs = [(m, methods[0]) for m in methods[1:]] + ([(methods[-1], methods[1])] if len(methods) > 2 else [])
    for a, b in pairs:
        cells = []
        for j in judge_names:
            d = paired(per_judge[j][a], per_judge[j][b])
            cells.append(f"{j} {d.fmt(3)} ({verdict(d)})")
        out.append(f"  {a} − {b}: " + "; ".join(cells))
    return "\n".join(out)


def write_trace(rows: Sequence[DemoRow], path: Path) -> None:
    traced = [TracedSearch(f"[{r.opening_index + 1}] {r.method}", r.opening, r.result) for r in rows]
    path.write_text(render_trace(traced, "w2s demo: base vs best-of-N vs CBS on film-review openings"))


async def demo_command(args: argparse.Namespace) -> int:
    from proxy.config.extras import require

    require("demo", "torch", "transformers", "vaderSentiment", "textblob", use="`w2s demo`")
    from proxy.film_reviews.judges import JUDGES

    fields = {"openings": args.openings, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              "temperature": args.temperature, "guide": args.guide}
    settings = DemoSettings(**{k: v for k, v in fields.items() if v is not None})
    async with offline_pair(settings.guide) as pair:
        async with Engine(AppConfig(upstream=pair.upstream, scorer=pair.scorer)) as engine:
            print(f"continuing {settings.openings} film-review openings x 3 methods, guide "
                  f"{settings.guide!r}, against {pair.upstream.base_url} ...", file=sys.stderr)
            rows = await run_demo(settings, engine, JUDGES)
    print(format_report(rows))
    if args.trace:
        write_trace(rows, Path(args.trace))
        print(f"\nsearch trace written to {args.trace}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="offline demo: base vs best-of-N vs CBS, Gemma 3 270M guided by SmolLM2-135M")
    p.add_argument("--openings", type=int, help=f"how many of the {len(TEST_OPENINGS)} film-review openings to run")
    p.add_argument("--guide", choices=["tuned", "contrast"], help="tuned: DPO adapter vs parent (default); "
                   "contrast: one model, positive vs negative review prefix")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--trace", help="write the search trees to this HTML file")
    p.set_defaults(func=demo_command)
