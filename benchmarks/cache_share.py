"""How much of what a search is billed for as prompt tokens a vLLM server serves from its prefix
cache: CBS and best-of-N at several shapes, a short and a long prompt, both OpenAI-style families.

    .venv/bin/python benchmarks/cache_share.py                  # starts the cached vLLM CPU build
    .venv/bin/python benchmarks/cache_share.py --searches 8 --max-new-tokens 32
    .venv/bin/python benchmarks/cache_share.py --engine http://gpu1:8001/v1 --served-model smol \\
        --block-size 16                                         # an engine you run (prefix caching on,
                                                                # --enable-prompt-tokens-details)

vLLM is tests/vllm_engine.py's (started the way benchmarks/remote_scorer.py starts it): its CPU
build serving SmolLM2-135M-Instruct in float32, automatic prefix caching on,
`--enable-prompt-tokens-details`, KV blocks of 128 tokens (the CPU build's default; GPUs default
to 16). Each search asks a question of its own (a fresh first block), so nothing is shared
between searches: what is cached is what the search's own requests re-sent. The usage is the
project's (`proxy.types.Usage`, read from `usage.prompt_tokens_details.cached_tokens`), summed
over the search; the share is cached / billed prompt tokens per search, mean ± standard error
over the searches (seeds 1..N). The scorer is a fixed hash of the text: which beams survive does
not matter here, only how many requests re-send how long a prefix.

What vLLM reports per request is one sample's count: a request of n samples bills its prompt once,
and a `openai-completions` request with a list of prompts (the family's default for a step's
beams) bills every prompt but reports the cached count of one, so its shares are a lower bound;
`openai-completions (no lists)` (`supports_prompt_lists: false`, one prompt per request) reports them all.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scorer import table  # noqa: E402

from proxy.config import SearchConfig  # noqa: E402
from proxy.search import search  # noqa: E402
from proxy.types import Conversation, Usage  # noqa: E402
from tests.doubles import FnScorer  # noqa: E402

SHAPES = {"best-of-4": dict(w=1, k=4), "CBS W2K2 L8": dict(w=2, k=2, l=8), "CBS W4K4 L4": dict(w=4, k=4, l=4)}
FAMILIES = {"openai-chat": ("openai-chat", {}),
            "openai-completions": ("openai-completions", {}),
            "openai-completions (no lists)": ("openai-completions", {"supports_prompt_lists": False})}
NOTES = " ".join(f"Note {i}: the keeper climbed the stairs at dusk and lit the lamp." for i in range(17))


def question(kind: str) -> Conversation:
    """A question no earlier request began with: about 40 tokens (short) or 340 (long) as SmolLM2's
    chat template renders it, system turn included."""
    nonce = uuid.uuid4().hex[:8]
    if kind == "short":
        return Conversation.instruction(f"Request {nonce}. Write one sentence about the sea.")
    return Conversation.instruction(f"Request {nonce}. Summarize these notes about a lighthouse. {NOTES}")


def hashed(text: str, finished: bool) -> float:
    return float(zlib.crc32(text.encode()))


@dataclass
class Cell:
    usages: list[Usage]

    @property
    def shares(self) -> list[float]:
        return [u.cached_tokens / u.prompt_tokens for u in self.usages]


def mean_se(xs: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m = statistics.mean(xs) * scale
    se = statistics.stdev(xs) / len(xs) ** 0.5 * scale if len(xs) > 1 else float("nan")
    return f"{m:.{digits}f} ± {se:.{digits}f}"


async def run_cell(server: Any, family: str, shape: str, prompt: str, searches: int, max_new_tokens: int) -> Cell:
    from tests.test_vllm_engine import make

    kind, settings = FAMILIES[family]
    spec = dict(SHAPES[shape])
    spec.setdefault("l", max_new_tokens)  # best-of-N: one step of the whole answer
    usages = []
    for seed in range(1, searches + 1):
        cfg = SearchConfig(**spec, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
        async with make(server, kind, **settings) as up:
            result = await search(question(prompt), up, FnScorer(hashed), cfg)
        usages.append(result.usage)
    return Cell(usages)


def start_vllm() -> tuple[Any, Any]:
    from tests import vllm_engine as v

    venv, model, _, _ = v.prepare()
    log = Path("runs") / "cache-share-vllm.log"
    log.parent.mkdir(exist_ok=True)
    proc, url, start_s = v.start_server(venv, model, log)
    print(f"vLLM {v.VLLM_VERSION} at {url}: up in {start_s:.0f} s (log: {log})", file=sys.stderr)
    return proc, v.VllmServer(url, v.SERVED_NAME, model, log, None, None, start_s)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--searches", type=int, default=4, help="seeded searches per cell")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    ap.add_argument("--engine", help="base URL of a running vLLM (default: start the cached CPU build)")
    ap.add_argument("--served-model", help="the engine's name for the model (with --engine)")
    ap.add_argument("--block-size", type=int, help="the engine's KV block size (with --engine)")
    args = ap.parse_args()
    families = [f.strip() for f in args.families.split(",")]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {list(FAMILIES)}")
    if args.engine and not (args.served_model and args.block_size):
        ap.error("--engine needs --served-model and --block-size")

    from tests import vllm_engine as v

    proc = None
    try:
        if args.engine:
            server = v.VllmServer(args.engine, args.served_model, Path("."), Path("."), None, None, 0.0)
            block = args.block_size
        else:
            proc, server = start_vllm()
            block = v.BLOCK_SIZE
        rows = [["prompt", "family", "search", "billed prompt tokens", "cached tokens", "share cached %",
                 "block size"]]
        t0 = time.perf_counter()
        for prompt in ("short", "long"):
            for family in families:
                for shape in SHAPES:
                    cell = await run_cell(server, family, shape, prompt, args.searches, args.max_new_tokens)
                    rows.append([prompt, family, shape, mean_se([float(u.prompt_tokens) for u in cell.usages], digits=0),
                                 mean_se([float(u.cached_tokens) for u in cell.usages], digits=0),
                                 mean_se(cell.shares, scale=100.0), str(block)])
                    print(f"  {prompt} / {family} / {shape} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        if proc is not None:
            v.kill_group(proc)
    print(f"\nShare of billed prompt tokens served from vLLM's prefix cache: {args.searches} seeded searches per "
          f"row (mean ± s.e. per search), {args.max_new_tokens} new tokens, temperature 1, KV blocks of {block} "
          f"tokens; short prompt ≈ 40 tokens, long ≈ 340 (SmolLM2's chat template included)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
