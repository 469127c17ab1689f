"""The remote scorer (the pair served by vLLM) against the local incremental scorer, on one
recorded CBS search, in one run: what the engine computes, wall time, and how wall time grows
with concurrent searches; optionally what bfloat16 changes.

    .venv/bin/python benchmarks/remote_scorer.py              # starts the cached vLLM CPU build (float32)
    .venv/bin/python benchmarks/remote_scorer.py --bf16       # and a bfloat16 engine, to compare
    .venv/bin/python benchmarks/remote_scorer.py --bf16-only  # that comparison alone
    .venv/bin/python benchmarks/remote_scorer.py --engine http://gpu1:8001/v1 --served-model smol \\
        --model-dir DIR                                       # an engine you run (same weights as DIR)

The recording is benchmarks/scorer.py's (benchmarks/data/cbs_w4k4l30.json: W=K=4, L=30, 512 new
tokens, a prompt-contrast pair on SmolLM2-135M-Instruct; every score call with its texts). Both
scorers get the same calls, a step's calls at once as the search sends them:

1. One search (its first `--steps` steps): tokens each side's model computed (the local
   scorer's own count; the engine's from its /metrics: vLLM's `prompt_tokens_by_source_total{source="local_compute"}` and its
   prefix-cache hits), against the minimum (the prompt once plus each candidate's new tokens);
   wall time; the largest score difference between the two.
2. 1, 8, 64 concurrent searches (the first `--sweep-steps` steps of the recording, each search
   with its own prompt so nothing is shared between them): wall time, and wall relative to one.
3. With --bf16 (or alone, --bf16-only): the engine in bfloat16 (what GPUs serve by default) and
   the local scorer in bfloat16 (its default on CUDA), each against the float32 local scorer:
   score differences, and at how many of the recording's selections the top W changes (per step,
   with how close the W-th and (W+1)-th candidates were in float32).

The defaults replay the first 6 of the recording's 18 steps as the one search and its first
step in the sweep: an engine on two shared CPU cores computes a few hundred tokens a second,
and the remote path computes every sequence whole (all 18 steps: ~280k tokens).

Without a GPU both sides share this machine's CPU cores, so the wall times say how the two
paths scale with load here, not what a GPU does; tokens computed do not depend on the machine.
vLLM here is tests/vllm_engine.py's: installed once into ~/.cache/w2s-proxy, float32, eager.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scorer import DEFAULT_RECORDING, Recording, calls_by_step, minimum_tokens, score_recording, table  # noqa: E402

from proxy.config import ScorerConfig  # noqa: E402
from scorers.base import Scorer  # noqa: E402
from scorers.registry import open_scorer  # noqa: E402


def engine_counters(base_url: str) -> dict[str, float]:
    """vLLM's prompt-token and prefix-cache counters (summed over label sets); {} from an engine
    without them."""
    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    patterns = {"computed": r'^vllm:prompt_tokens_by_source_total\{[^}]*source="local_compute"[^}]*\} (\S+)',
                "cache_hit": r'^vllm:prompt_tokens_by_source_total\{[^}]*source="local_cache_hit"[^}]*\} (\S+)',
                "prompt": r"^vllm:prompt_tokens_total\{[^}]*\} (\S+)",
                "prefix_queries": r"^vllm:prefix_cache_queries_total\{[^}]*\} (\S+)"}
    for name, pattern in patterns.items():
        values = [float(v) for v in re.findall(pattern, text, re.M)]
        if values:
            out[name] = sum(values)
    return out


def delta(after: dict[str, float], before: dict[str, float], key: str) -> str:
    return f"{after[key] - before.get(key, 0.0):.0f}" if key in after else "n/a"


def scorer_config(rec: Recording, model_dir: str, engine: dict | None, dtype: str = "float32") -> ScorerConfig:
    sides = {"tuned": {"path": model_dir, "system_prompt": rec.positive_system},
             "untuned": {"path": model_dir, "system_prompt": rec.negative_system}}
    if engine is None:
        return ScorerConfig.model_validate({**sides, "device": "cpu", "dtype": dtype, "batch_size": 16,
                                            "max_batch_tokens": 16384})
    return ScorerConfig.model_validate({"kind": "remote", "batch_size": 16,
                                        **{k: {**v, "engine": engine} for k, v in sides.items()}})


async def replay(rec: Recording, scorer: Scorer, *, copies: int = 1, steps: int | None = None) -> tuple[float, list[float]]:
    """Wall seconds for `copies` concurrent replays of the recording (its first `steps` steps),
    and the scores of the first copy in call order. Copy i > 0 asks with a prompt of its own."""
    by_step = calls_by_step(rec, steps)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        score_recording(rec, scorer, rec.instruction if i == 0 else f"(Request {i}.) {rec.instruction}", by_step)
        for i in range(copies)))
    return time.perf_counter() - t0, results[0]


def step_indices(rec: Recording) -> dict[int, list[int]]:
    """Each step's candidates, as positions in the replay's score list (call order)."""
    pos = 0
    by_step: dict[int, list[int]] = {}
    for call in rec.calls:
        by_step.setdefault(call.step, []).extend(range(pos, pos + len(call.nodes)))
        pos += len(call.nodes)
    return by_step


def selections_changed(rec: Recording, a: list[float], b: list[float]) -> tuple[int, int]:
    """Per step, the top W of the step's candidates by each score list: (steps where the sets
    differ, steps)."""
    w = rec.search.w
    top = lambda s, idx: set(sorted(idx, key=lambda i: -s[i])[:w])  # noqa: E731
    by_step = step_indices(rec)
    return sum(top(a, idx) != top(b, idx) for idx in by_step.values()), len(by_step)


def start_vllm(dtype: str) -> tuple[object, str, str, str]:
    """The cached vLLM CPU build serving SmolLM2 in `dtype` (tests/vllm_engine.py's helpers)."""
    from tests import vllm_engine as v

    venv, model, _, _ = v.prepare()
    log = Path("runs") / f"remote-scorer-vllm-{dtype}.log"
    log.parent.mkdir(exist_ok=True)
    proc, url, start_s = v.start_server(venv, model, log, dtype)
    print(f"vLLM {v.VLLM_VERSION} ({dtype}) at {url}: up in {start_s:.0f} s (log: {log})", file=sys.stderr)
    return proc, url, v.SERVED_NAME, str(model)


def stop_vllm(proc: object) -> None:
    from tests import vllm_engine as v

    v.kill_group(proc)  # type: ignore[arg-type]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recording", type=Path, default=DEFAULT_RECORDING)
    ap.add_argument("--engine", help="base URL of a running engine (default: start the cached vLLM CPU build)")
    ap.add_argument("--served-model", help="the engine's name for the model (with --engine)")
    ap.add_argument("--model-dir", help="the model's directory (tokenizer; the local scorer's weights)")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--steps", type=int, default=6, help="steps of the recording replayed as the one search (18: all)")
    ap.add_argument("--sweep-steps", type=int, default=1, help="steps of the recording per search in the sweep")
    ap.add_argument("--bf16", action="store_true", help="also start a bfloat16 engine and compare")
    ap.add_argument("--bf16-only", action="store_true",
                    help="only section 3: the local float32 scores against a bfloat16 engine's and the local bfloat16 ones")
    args = ap.parse_args()
    rec = Recording.model_validate_json(args.recording.read_text())
    rec = rec.model_copy(update={"calls": [c for c in rec.calls if c.step <= args.steps]})
    levels = [int(x) for x in args.concurrency.split(",")]

    if args.engine and (args.bf16 or args.bf16_only):
        ap.error("--bf16 and --bf16-only start their own engines (the cached vLLM CPU build); leave out --engine")
    if args.engine and not (args.served_model and args.model_dir):
        ap.error("--engine needs --served-model and --model-dir")
    proc = None
    try:
        if args.bf16_only:
            proc, url16, served, model_dir = start_vllm("bfloat16")
            s_local = await local_scores(rec, model_dir)
        else:
            if args.engine:
                url, served, model_dir = args.engine, args.served_model, args.model_dir
            else:
                proc, url, served, model_dir = start_vllm("float32")
            s_local = await compare_float32(rec, url, served, model_dir, levels, args.sweep_steps)
            if args.bf16:
                stop_vllm(proc)
                proc, url16, _, _ = start_vllm("bfloat16")
        if args.bf16 or args.bf16_only:
            remote16 = await open_scorer(scorer_config(rec, model_dir, engine_spec(url16, served)))
            _, s16 = await replay(rec, remote16)
            await remote16.aclose()
            local16 = await local_scores(rec, model_dir, "bfloat16")
            report_bf16(rec, s_local, {"vLLM bfloat16": s16, "local bfloat16": local16})
    finally:
        if proc is not None:
            stop_vllm(proc)
    return 0


def engine_spec(url: str, served: str) -> dict:
    return {"base_url": url, "model": served, "timeout_s": 600, "max_concurrency": 64}


async def local_scores(rec: Recording, model_dir: str, dtype: str = "float32") -> list[float]:
    local = await open_scorer(scorer_config(rec, model_dir, None, dtype))
    try:
        return (await replay(rec, local))[1]
    finally:
        await local.aclose()


async def compare_float32(rec: Recording, url: str, served: str, model_dir: str, levels: list[int],
                          sweep_steps: int) -> list[float]:
    """Sections 1 and 2 (the float32 engine against the local scorer); the local scorer's scores."""
    local = await open_scorer(scorer_config(rec, model_dir, None))
    remote = await open_scorer(scorer_config(rec, model_dir, engine_spec(url, served)))
    minimum = sum(minimum_tokens(rec, remote.sides))  # type: ignore[attr-defined]
    n_scored = sum(len(c.nodes) for c in rec.calls)
    print(f"\nRecorded CBS search: W={rec.search.w} K={rec.search.k} L={rec.search.l}, "
          f"{len({c.step for c in rec.calls})} steps, {n_scored} candidates; pair: SmolLM2-135M-Instruct, prompt "
          f"contrast (one model, two system prompts); engine: {url} ({served})\n")

    wall_local, s_local = await replay(rec, local)
    before = engine_counters(url)
    wall_remote, s_remote = await replay(rec, remote)
    after = engine_counters(url)
    local_tokens = sum(local.tokens_run)  # type: ignore[attr-defined]
    remote_tokens = sum(remote.tokens_sent)  # type: ignore[attr-defined]
    rows = [["scorer", "tokens computed (both sides)", "x minimum", "engine prefix-cache hits", "wall s"],
            ["minimum (prompt once + new tokens)", str(minimum), "1.00", "", ""],
            ["local incremental (this process)", str(local_tokens), f"{local_tokens / minimum:.2f}", "", f"{wall_local:.1f}"],
            ["remote (engine, prompt_logprobs)", f"{remote_tokens} sent; engine: {delta(after, before, 'computed')}",
             f"{remote_tokens / minimum:.2f}", delta(after, before, "cache_hit"), f"{wall_remote:.1f}"]]
    print(table(rows))
    diffs = [abs(a - b) for a, b in zip(s_local, s_remote)]
    changed, selections = selections_changed(rec, s_local, s_remote)
    print(f"\nremote vs local, float32: largest score difference {max(diffs):.2e}, mean {statistics.mean(diffs):.2e} "
          f"over {len(diffs)} candidates; selections changed: {changed} of {selections}")
    print(f"engine prefix-cache queries during the remote replay: {delta(after, before, 'prefix_queries')}")

    print(f"\nConcurrent searches (first {sweep_steps} steps of the recording each, own prompts):\n")
    rows = [["searches", "local wall s", "local x one", "remote wall s", "remote x one", "remote / local"]]
    base: dict[str, float] = {}
    for n in levels:
        walls = {}
        for name, scorer in (("local", local), ("remote", remote)):
            walls[name], _ = await replay(rec, scorer, copies=n, steps=sweep_steps)
            base.setdefault(name, walls[name])
        rows.append([str(n), f"{walls['local']:.1f}", f"{walls['local'] / base['local']:.1f}",
                     f"{walls['remote']:.1f}", f"{walls['remote'] / base['remote']:.1f}",
                     f"{walls['remote'] / walls['local']:.2f}"])
        print(f"  {n} done", file=sys.stderr)
    print(table(rows))
    await remote.aclose()
    await local.aclose()
    return s_local


def report_bf16(rec: Recording, s_local: list[float], others: dict[str, list[float]]) -> None:
    """Section 3: how far bfloat16 scores (the engine's; the local scorer's, as a GPU runs it by
    default) are from the local float32 ones, and whether that moves the top W; the margin is how
    close each step's W-th and (W+1)-th candidates were in float32."""
    w = rec.search.w
    print(f"\nbfloat16 against the local float32 scores ({len(s_local)} candidates; float32 scores range "
          f"{min(s_local):.1f} to {max(s_local):.1f}):\n")
    rows = [["scores", "largest difference", "mean difference", f"selections whose top {w} changed"]]
    for name, s in others.items():
        d = [abs(a - b) for a, b in zip(s_local, s)]
        changed, steps = selections_changed(rec, s_local, s)
        rows.append([name, f"{max(d):.3f}", f"{statistics.mean(d):.3f}", f"{changed} of {steps}"])
    print(table(rows) + "\n")
    rows = [["step", "candidates", "float32 margin at W"] + [f"{n}: largest diff, top W same" for n in others]]
    for step, idx in step_indices(rec).items():
        order = sorted(idx, key=lambda i: -s_local[i])
        margin = s_local[order[w - 1]] - s_local[order[w]] if len(order) > w else float("nan")
        cells = []
        for s in others.values():
            same = set(order[:w]) == set(sorted(idx, key=lambda i: -s[i])[:w])
            cells.append(f"{max(abs(s_local[i] - s[i]) for i in idx):.3f}, {'yes' if same else 'no'}")
        rows.append([str(step), str(len(idx)), f"{margin:.3f}"] + cells)
    print(table(rows))


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
