"""The scorer on a GPU, first run (issue 28): correctness checks, then the measurements.

    python3 benchmarks/gpu/run.py --install --device cuda --model mistral-7b-random --out $OUT --budget-s 480
    .venv/bin/python benchmarks/gpu/run.py --device cpu --model tiny --out /tmp/gpu-dry --budget-s 60   # dry run

Made for a bare lent GPU machine (docs/gpu.md): no network, no hub, so the models are random
weights in the real architecture (Mistral-7B: hidden 4096, 32 layers, 32 heads, 8 KV heads,
intermediate 14336, vocabulary 32000; throughput and memory do not depend on the weights' values)
and the tokenizer is the 32,000-id one benchmarks/gpu/fetch_wheels.py wrote. `--install` first
installs the carried wheels offline (pip --no-index) into a folder on PYTHONPATH.

Sections, each written to --out as markdown and JSON as soon as it is done (tables.md, results.json),
skipped with the reason when what is left of --budget-s will not hold it:
1. correctness on the device: incremental vs full recompute in float32 (eager attention, within
   1e-4) and in bfloat16 (within BF16_TOL_PER_TOKEN nats per scored token); KV-cache eviction
   (a tiny max_cached_tokens: evictions happen, scores unchanged) and batching (concurrent
   searches share forward passes, scores unchanged);
2. memory: weights, KV bytes per token and at the default max_cached_tokens, measured peaks;
3. scored tokens per second of the recorded CBS W4K4 L30 trace (benchmarks/data/cbs_w4k4l30.json)
   at 1, 8 and 64 concurrent searches, and that as a share of the roofline: 2 FLOP per parameter
   of both models per token (attention's own FLOPs left out) over a bf16 matmul's measured rate;
4. the incremental scorer against the same trace fully recomputed (one search);
5. the server (benchmarks/server.py): 1/8/64 concurrent guided requests with this scorer, ratio to ideal;
6. optionally pytest on tests/test_incremental_scorer.py (its models are CPU fp32; this checks the
   carried environment, not CUDA).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "benchmarks" / "gpu" / "wheels"
SITE = Path("/tmp/w2s-gpu-site")
FP32_TOL = 1e-4
BF16_TOL_PER_TOKEN = 0.05
"""bf16: |incremental - full| of a score, divided by its response's token count, at most this (nats).
bf16 keeps 8 bits of mantissa, so each token's log-probability carries ~1e-2 of rounding that
depends on batch shape and cached vs recomputed keys; a seam bug instead shifts whole tokens
(several nats)."""


def install(argv: list[str]) -> None:
    """pip install the carried wheels offline into SITE, then run this script again with it on PYTHONPATH."""
    wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {WHEELS}: run benchmarks/gpu/fetch_wheels.py on a machine with PyPI "
                         "and carry benchmarks/gpu/wheels")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels], check=True)
    print(f"installed {len(wheels)} wheels offline into {SITE} in {time.perf_counter() - t0:.1f} s", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")])))
    os.execve(sys.executable, [sys.executable, __file__, *[a for a in argv if a != "--install"]], env)


if __name__ == "__main__" and "--install" in sys.argv:
    install(sys.argv[1:])

sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import asyncio  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import threading  # noqa: E402

import torch  # noqa: E402

from proxy.config import ModelSpec, ScorerConfig  # noqa: E402
from scorers.implicit import ImplicitRewardScorer  # noqa: E402

import scorer as bench  # noqa: E402  (benchmarks/scorer.py)

MISTRAL_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=32000)
"""Mistral-7B-v0.1's shape (zephyr-7b-beta and mistral-7b-sft-beta share it); benchmarks/scorer.py holds the same
values under "mistral-7b"."""
DEFAULTS = ScorerConfig.model_fields
MAX_CACHED = DEFAULTS["max_cached_tokens"].default
BATCH = DEFAULTS["batch_size"].default
BATCH_TOKENS = DEFAULTS["max_batch_tokens"].default


class Report:
    """Tables in order, rewritten to --out after every section, so a run cut short keeps what it did."""

    def __init__(self, out: Path, header: str) -> None:
        self.out, self.parts, self.data = out, [header], {"sections": {}}
        self.t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, key: str, title: str, rows: list[list[str]] | None, note: str = "", **data: object) -> None:
        data["at_s"] = round(time.perf_counter() - self.t0, 1)
        text = f"\n## {title}\n\n" + (bench.table(rows) + "\n" if rows else "") + (f"\n{note}\n" if note else "")
        print(f"[{data['at_s']:.0f} s]{text}", flush=True)
        self.parts.append(text)
        self.data["sections"][key] = {"title": title, "rows": rows, "note": note, **data}
        self.flush()

    def flush(self) -> None:
        (self.out / "tables.md").write_text("".join(self.parts))
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def tokenizer_for(model: str):
    if model == "tiny":
        from tiny_models import build_tokenizer_a

        return build_tokenizer_a()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(WHEELS / "tokenizer-32k")


def pair(model: str, tok, device, dtype, *, layers: int | None = None, attn: str | None = None):
    if model == "tiny":
        return bench.random_pair("mistral-small-test", tok, device, dtype, num_hidden_layers=layers,
                                 attn_implementation=attn)
    return bench.random_pair("mistral-7b", tok, device, dtype, vocab_size=MISTRAL_7B["vocab_size"],
                             num_hidden_layers=layers, attn_implementation=attn)


def make_scorer(models, tok, rec, *, incremental: bool = True, max_cached: int | None = MAX_CACHED,
                batch_size: int = BATCH) -> ImplicitRewardScorer:
    tuned, untuned = models
    return ImplicitRewardScorer.from_loaded(
        (tuned, tok, ModelSpec(path="random-a", system_prompt=rec.positive_system)),
        (untuned, tok, ModelSpec(path="random-b", system_prompt=rec.negative_system)),
        incremental=incremental, batch_size=batch_size, max_batch_tokens=BATCH_TOKENS, max_cached_tokens=max_cached)


def response_tokens(scorer: ImplicitRewardScorer, rec, max_step: int | None) -> list[int]:
    """Tokens of each scored response (tuned side), in the order the replays return scores."""
    side = scorer.tuned
    prompt = side.encode_prompt(side.render(bench.as_messages(rec.instruction)))
    return [max(1, len(side.encode_response(prompt, rec.text(n), rec.nodes[n].finished).ids) - len(prompt.ids))
            for c in rec.calls if max_step is None or c.step <= max_step for n in c.nodes]


async def check_pair(models, tok, rec, *, steps: int, label: str, tol: float, per_token: bool) -> list[str]:
    inc, full = make_scorer(models, tok, rec), make_scorer(models, tok, rec, incremental=False)
    a = await bench.concurrent_replay(rec, inc, 1, distinct_prompts=False, max_step=steps)
    b = await bench.concurrent_replay(rec, full, 1, distinct_prompts=False, max_step=steps)
    n = response_tokens(inc, rec, steps)
    diffs = [abs(x - y) / (k if per_token else 1) for x, y, k in zip(a.scores[0], b.scores[0], n)]
    for s in (inc, full):
        await s.aclose()
    worst = max(diffs)
    unit = "nats per token" if per_token else "nats"
    return [label, str(len(diffs)), f"{worst:.2e} {unit}", f"{tol:g}", "pass" if worst <= tol else "FAIL",
            f"{sum(b.tokens) / max(1, sum(a.tokens)):.1f}x"]


async def check_cache(models, tok, rec, *, steps: int, searches: int, tol: float) -> list[list[str]]:
    """Eviction: a pool far smaller than `searches` sessions hold; batching: their calls share forwards."""
    full = make_scorer(models, tok, rec, incremental=False)
    want = (await bench.concurrent_replay(rec, full, 1, distinct_prompts=False, max_step=steps)).scores[0]
    await full.aclose()
    rows = []
    for label, cap in (("batching (unbounded cache)", None), ("eviction (max_cached_tokens 600)", 600)):
        s = make_scorer(models, tok, rec, max_cached=cap)
        got = await bench.concurrent_replay(rec, s, searches, distinct_prompts=False, max_step=steps)
        stats = await s.cache_stats()
        calls = searches * sum(1 for c in rec.calls if c.step <= steps)
        worst = max(abs(x - y) for sc in got.scores for x, y in zip(sc, want))
        ok = worst <= tol and (s.batch_jobs < calls if cap is None else stats.evictions > 0)
        rows.append([label, str(searches), str(calls), str(s.batch_jobs), str(stats.evictions), f"{worst:.2e}",
                     "pass" if ok else "FAIL"])
        await s.aclose()
    return rows


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in `dtype` (8192 on a GPU, 1024 on a CPU): the roofline's peak."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flop_per_token(models) -> int:
    """2 FLOP per weight that a token multiplies (input embeddings are a lookup, so left out), both models."""
    return sum(2 * (sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()) for m in models)


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--model", choices=["mistral-7b-random", "tiny"], default="mistral-7b-random")
    ap.add_argument("--dtype", default="bfloat16", help="of the measured pair (the checks run float32 and bfloat16)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--searches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--check-steps", type=int, default=4, help="recorded steps the correctness checks replay")
    ap.add_argument("--max-step", type=int, help="cut the trace after this step for the throughput runs (dry runs)")
    ap.add_argument("--server-repeats", type=int, default=3)
    ap.add_argument("--pytest", action="store_true", help="also run tests/test_incremental_scorer.py (CPU models)")
    ap.add_argument("--install", action="store_true", help="install benchmarks/gpu/wheels offline first")
    args = ap.parse_args()

    budget = Budget(args.budget_s)
    # A forward cannot be interrupted from another thread: past the budget plus a grace period, stop.
    watchdog = threading.Timer(args.budget_s + 60, lambda: (print("budget + 60 s spent: stopping", flush=True),
                                                             os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import transformers

    command = "python3 benchmarks/gpu/run.py " + " ".join(sys.argv[1:])
    report = Report(args.out, f"# w2s scorer on {card}\n\n{when}; torch {torch.__version__}, transformers "
                              f"{transformers.__version__}, Python {platform.python_version()}; model {args.model}, "
                              f"{args.dtype}; budget {args.budget_s:.0f} s\n\n    {command}\n")
    report.data.update(card=card, date=when, torch=torch.__version__, transformers=transformers.__version__,
                       model=args.model, dtype=args.dtype, device=args.device, command=command)
    rec = bench.Recording.model_validate_json(bench.DEFAULT_RECORDING.read_text())
    if args.model == "tiny":  # its 400-token tokenizer spends ~1 token per byte: a shorter prompt keeps the dry run short
        rec = rec.model_copy(update={"instruction": rec.instruction[:160]})
    tok = tokenizer_for(args.model)
    skipped: list[str] = []

    # 1. correctness: fp32 on a 2-layer model of the real width (eager attention), then bf16 on the measured pair
    t0 = time.perf_counter()
    small = pair(args.model, tok, device, torch.float32, layers=2, attn="eager")
    rows = [["check", "scores", "max |incremental - full|", "tolerance", "result", "full / incremental tokens"]]
    rows.append(await check_pair(small, tok, rec, steps=args.check_steps, tol=FP32_TOL, per_token=False,
                                 label="float32, eager attention, 2 layers"))
    cache_rows = [["check", "searches", "score calls", "batcher jobs", "evictions", "max |diff| vs full", "result"]]
    cache_rows += await check_cache(small, tok, rec, steps=args.check_steps, searches=4, tol=FP32_TOL)
    del small
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t_load = time.perf_counter()
    models = pair(args.model, tok, device, dtype)
    sync(device)
    load_s = time.perf_counter() - t_load
    rows.append(await check_pair(models, tok, rec, steps=args.check_steps, tol=BF16_TOL_PER_TOKEN, per_token=True,
                                 label=f"{args.dtype}, default attention, full depth"))
    ok = all(r[4] == "pass" for r in rows[1:]) and all(r[-1] == "pass" for r in cache_rows[1:])
    report.add("correctness", f"Correctness on {args.device}: incremental vs full recompute "
                              f"(first {args.check_steps} steps of the trace)", rows,
               f"float32 within {FP32_TOL:g} nats per score; {args.dtype} within {BF16_TOL_PER_TOKEN} nats per "
               f"scored response token. {time.perf_counter() - t0:.1f} s.", passed=ok)
    report.add("cache", "KV-cache eviction and micro-batching (float32, 2 layers, 4 concurrent searches)", cache_rows,
               "Batching passes when concurrent calls share forward passes (batcher jobs < score calls); eviction "
               "when the pool evicted and every score still equals full recompute.")

    # 2. memory
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    kv_tok = sum(kv_bytes_per_token(m) for m in models) / 2  # the pool counts positions of both models together
    fpt = flop_per_token(models)
    mem = {"weights_bytes": weights, "kv_bytes_per_pool_token": kv_tok, "max_cached_tokens": MAX_CACHED,
           "load_s": load_s, "flop_per_token": fpt}
    if device.type == "cuda":
        mem["allocated_after_load"] = torch.cuda.memory_allocated(device)

    # 3. throughput at 1 / 8 / 64 searches
    peak = matmul_rate(device, dtype)
    thr = [["concurrent searches", "scored tokens", "wall s", "scored tok/s", "TFLOP/s", "share of roofline",
            "evictions", "peak GPU GiB"]]
    per_search_tokens = rate = None
    results = {}
    for n in args.searches:
        est = per_search_tokens * n / rate if rate else 0
        if not budget.fits(est * 1.3 + 30):
            skipped.append(f"{n} concurrent searches (estimated {est:.0f} s, {budget.left():.0f} s left)")
            continue
        s = make_scorer(models, tok, rec)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = await bench.concurrent_replay(rec, s, n, max_step=args.max_step)
        stats = await s.cache_stats()
        await s.aclose()
        total = sum(r.tokens) / 2  # a scored token runs through both models; fpt counts both
        rate, per_search_tokens = total / r.wall_s, total / n
        flops = rate * fpt
        gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        results[n] = {"tokens": r.tokens, "wall_s": r.wall_s, "tok_s": rate, "flop_s": flops, "share": flops / peak,
                      "pool_tokens": stats.tokens, "evictions": stats.evictions, "peak_bytes": gpu_peak}
        thr.append([str(n), f"{total:.0f}", f"{r.wall_s:.1f}", f"{rate:.0f}", f"{flops / 1e12:.2f}", f"{flops / peak:.1%}",
                    str(stats.evictions), gib(gpu_peak) if gpu_peak else "-"])
    cut = f" (cut after step {args.max_step})" if args.max_step else ""
    report.add("throughput", f"Scored tokens per second, CBS W4K4 L30 trace{cut}, {args.dtype}, batch_size {BATCH}, "
                             f"max_batch_tokens {BATCH_TOKENS}, max_cached_tokens {MAX_CACHED}", thr,
               f"scored tokens: tokens run through the pair (the mean of the two sides' counts; the trace is "
               f"benchmarks/data/cbs_w4k4l30.json; search i's prompt starts with '(i) ' so none share one). Roofline: "
               f"{fpt / 1e9:.2f} GFLOP per scored token through both models (2 per non-embedding weight; attention's "
               f"own FLOPs left out), over a {args.dtype} "
               f"matmul measured at {peak / 1e12:.1f} TFLOP/s on this device.",
               results=results, matmul_flop_s=peak)
    mem_rows = [["what", "GiB"], ["weights, both models", gib(weights)],
                ["KV cache per token position (pool counts both models' positions)", f"{kv_tok / 2**20:.3f} MiB"],
                [f"KV cache at the default max_cached_tokens {MAX_CACHED}", gib(kv_tok * MAX_CACHED)],
                ["weights + that KV cache", gib(weights + kv_tok * MAX_CACHED)]]
    if device.type == "cuda":
        mem_rows.append(["measured: allocated after loading", gib(mem["allocated_after_load"])])
        if results:
            top = max(results)
            mem_rows.append([f"measured: peak during {top} concurrent searches", gib(results[top]["peak_bytes"])])
    report.add("memory", f"Memory, {args.model} pair in {args.dtype} (random init in {load_s:.1f} s)", mem_rows,
               "" if device.type == "cuda" else "CPU: computed sizes only.", **mem)

    # 4. incremental vs full recompute, one search
    if 1 in results:
        est = sum(results[1]["tokens"]) / 2 * 12 / results[1]["tok_s"]  # full recompute ran ~10x the tokens on CPU
        if budget.fits(est + 20):
            full = make_scorer(models, tok, rec, incremental=False)
            f = await bench.concurrent_replay(rec, full, 1, max_step=args.max_step)
            await full.aclose()
            i = results[1]
            rows = [["scorer", "tokens run (both sides)", "wall s", "tokens run per s"],
                    ["incremental", str(sum(i["tokens"])), f"{i['wall_s']:.1f}", f"{sum(i['tokens']) / i['wall_s']:.0f}"],
                    ["full recompute", str(sum(f.tokens)), f"{f.wall_s:.1f}", f"{sum(f.tokens) / f.wall_s:.0f}"],
                    ["full / incremental", f"{sum(f.tokens) / sum(i['tokens']):.1f}x", f"{f.wall_s / i['wall_s']:.1f}x",
                     ""]]
            report.add("recompute", "Incremental vs full recompute, the same trace, one search", rows)
        else:
            skipped.append(f"full recompute (estimated {est:.0f} s, {budget.left():.0f} s left)")

    # 5. the server with this scorer
    import server as server_bench  # benchmarks/server.py

    est = 20 + 3 * args.server_repeats * 4  # start-up, then 1/8/64-way bursts of ~0.8 s ideal, a few s each
    if budget.fits(est):
        label = f"real ImplicitRewardScorer, {args.model} pair, {args.device} {args.dtype}"
        rows_s = await server_bench.throughput("given", [1, 8, 64], args.server_repeats,
                                               scorer=make_scorer(models, tok, rec), label=label)
        rows = [["concurrent", "makespan s", "ratio to ideal", "range", "server CPU ms/request"]]
        rows += [[str(r[0]), f"{r[1]:.3f}", f"{r[4]:.2f}", r[5], f"{r[6]:.1f}"] for r in rows_s]
        report.add("server", f"Server, guided CBS W2 K2 L8 ({server_bench.STEPS} steps, upstream latency "
                             f"{server_bench.LATENCY_S * 1e3:.0f} ms), {label}, median of {args.server_repeats}", rows,
                   "Ratio = ideal makespan / measured (CPU figure with the tiny pair: 0.49 at 64-way).",
                   ratios={r[0]: r[4] for r in rows_s})
    else:
        skipped.append(f"server benchmark (estimated {est:.0f} s, {budget.left():.0f} s left)")

    # 6. the CPU test file, to check the carried environment
    if args.pytest:
        if budget.fits(120):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                "tests/test_incremental_scorer.py"], cwd=ROOT, capture_output=True, text=True,
                               timeout=max(30, budget.left() - 10))
            tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
            report.add("pytest", "tests/test_incremental_scorer.py (CPU models, this environment)",
                       [["rc", "summary", "s"], [str(p.returncode), tail[0], f"{time.perf_counter() - t:.0f}"]])
        else:
            skipped.append("pytest (needs ~120 s)")
    report.add("skipped", "Skipped for the budget", [["section"]] + [[s] for s in skipped] if skipped else None,
               "" if skipped else "nothing", skipped=skipped)
    print(f"done in {args.budget_s - budget.left():.0f} s; tables in {args.out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
