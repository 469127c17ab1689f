"""AlpacaEval generation throughput: all 805 instructions through a slow upstream, guided.

The upstream is the loopback OpenAI completions server in its own process with a fixed
latency per request (300 ms by default, about what a hosted API answers a short completion
in); guidance is the tiny offline scorer pair from tests/tiny_models.py, so the numbers show
what the runner's concurrency buys when the upstream's latency dominates, and where the one
scoring worker thread starts to matter. Each concurrency level writes a fresh output
directory (no resume), and the answers of all levels are compared: with a seed they must be
identical whatever the concurrency.

    .venv/bin/python benchmarks/alpaca_eval_run.py [--instructions FILE] [--limit N]
        [--concurrency 1 16 64] [--latency-s 0.3] [--search cbs-w2k2l30]

FILE defaults to ../shared/data/alpaca_eval/alpaca_eval_gpt4_baseline.json when present, else
the Hugging Face dataset.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from proxy.alpaca_eval.dataset import load_instructions, select  # noqa: E402
from proxy.alpaca_eval.outputs import OUTPUTS_NAME, RunSummary  # noqa: E402
from proxy.alpaca_eval.runner import run_alpaca_eval  # noqa: E402
from proxy.client import GuidedClient  # noqa: E402
from proxy.config import AppConfig, OpenAICompletionsConfig, Prices, SearchConfig, search_with  # noqa: E402
from proxy.presets import load_preset  # noqa: E402
from proxy.search import mode_name  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json"


def start_loopback(latency_s: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "proxy.testing.toy_server", "--port", "0", "--latency-s", str(latency_s)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"loopback server did not start: {url!r}")
    return proc, url


def long_context_pair(root: Path) -> tuple[Path, Path]:
    """The tiny llama pair of tests/tiny_models.py with 4096 positions instead of 512: its small
    byte-level vocabulary spends up to ~1,300 tokens on the longest AlpacaEval instructions, and
    llama's rotary positions have no learned table, so only the configured limit changes."""
    from tiny_models import build_tiny_model, build_tokenizer_a

    tok = build_tokenizer_a()
    paths = []
    for name, seed in (("llama-tuned", 1), ("llama-untuned", 2)):
        model = build_tiny_model("llama", tok, seed)
        model.config.max_position_embeddings = 4096
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1]


async def one_level(cfg: AppConfig, selection, concurrency: int, out: Path) -> tuple[RunSummary, float]:  # type: ignore[no-untyped-def]
    async with GuidedClient(cfg) as client:  # scorer load is outside the timed part
        t0 = time.perf_counter()
        summary = await run_alpaca_eval(client, selection, out, concurrency=concurrency, progress=False)
        return summary, time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instructions", default=str(SHARED) if SHARED.is_file() else None)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--latency-s", type=float, default=0.3)
    ap.add_argument("--search", default="cbs-w2k2l30", help="search preset (configs/search/)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads for the scorer (1: no spinning threads fighting the event loop "
                         "on a small shared CPU)")
    args = ap.parse_args()

    from tiny_models import cpu_scorer_config

    items, source = load_instructions(args.instructions)
    selection = select(items, source, limit=args.limit)
    work = Path(tempfile.mkdtemp(prefix="w2s-ae-bench-"))
    tuned, untuned = long_context_pair(work / "models")
    search = search_with(SearchConfig.model_validate(load_preset("search", args.search)), seed=args.seed)
    server, url = start_loopback(args.latency_s)
    try:
        cfg = AppConfig(
            upstream=OpenAICompletionsConfig(model="toy-instruct", base_url=url, max_concurrency=4096,
                                             prices=Prices(prompt=1.5, completion=2.0)),
            scorer=cpu_scorer_config(tuned, untuned).model_copy(update={"torch_threads": args.torch_threads}),
            search=search,
        )
        print(f"{len(selection)} instructions from {source}; search {mode_name(search)} (max_new_tokens "
              f"{search.max_new_tokens}); loopback latency {args.latency_s * 1000:.0f} ms per request; "
              f"tiny scorer on CPU")
        results = []
        for n, c in enumerate(args.concurrency):
            summary, wall = await one_level(cfg, selection, c, work / f"run{n}-c{c}")
            results.append((c, summary, wall))
            print(f"  concurrency {c}: {wall:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait()

    base_wall = results[0][2]
    head = (f"{'concurrency':>11} {'wall s':>8} {'items/s':>8} {'speedup':>8} {'floor s':>8} {'mean steps':>10} "
            f"{'calls':>6} {'prompt tok':>10} {'compl tok':>9} {'cost $':>8} {'failed':>6}")
    print()
    print(head)
    print("-" * len(head))
    for c, s, wall in results:
        # floor: the upstream latency alone, if `c` items were always in flight and steps never waited
        steps = (s.stats.mean_steps or 0) * s.stats.answered
        floor = steps * args.latency_s / c
        print(f"{c:>11} {wall:>8.1f} {len(selection) / wall:>8.2f} {base_wall / wall:>7.1f}x {floor:>8.1f} "
              f"{s.stats.mean_steps or 0:>10.2f} {s.stats.upstream_calls:>6} {s.stats.prompt_tokens:>10} "
              f"{s.stats.completion_tokens:>9} {s.stats.cost_usd:>8.4f} {s.failed:>6}")
    outs = [json.loads((work / f"run{n}-c{c}" / OUTPUTS_NAME).read_text())
            for n, (c, s, _) in enumerate(results) if s.complete]
    same = all(o == outs[0] for o in outs)
    print(f"\nanswers identical across concurrency levels: {'yes' if same and len(outs) == len(results) else 'NO'}")
    print(f"outputs under {work}")


if __name__ == "__main__":
    asyncio.run(main())
