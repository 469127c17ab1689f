"""The guidance server under load against a slow, faulty upstream: what completes, what fails
clearly, what is lost, how long it takes, and how much memory the server needs.

    .venv/bin/python benchmarks/load.py [--requests 200] [--concurrency 32] [--fault-rate 0.2]
                                        [--latency-s 0.05] [--mix plain=1,bon4=1,cbs=1]

Three processes, as in benchmarks/server.py: the toy upstream (`python -m proxy.testing.toy_server`
with --latency-s and --fault-rate: 429 with Retry-After, 500, 503, hangs past the upstream
timeout, connection resets, bodies cut short, malformed or truncated JSON, no choices, empty
length-finished choices, and the legitimate odd answers: fewer choices, empty text), a real
`w2s serve` process (guided modes scored by the tiny random Llama pair of tests/tiny_models.py
on the CPU, `--scorer none` for plain sampling only), and this one, the load generator.

Each request is classified:
  completed  a 200 with a well-formed answer (for a stream: chunks, a finish reason, [DONE]);
  failed     a clear OpenAI-shaped error: HTTP 502/504, or the same error as an event of a stream
             (which then ends without [DONE]);
  lost       anything else: another status, a malformed answer, a dropped connection, or no
             answer within --request-timeout-s.
Then 100 concurrent plain requests on one proxy key with a 300-token budget (a fault-free toy
upstream): how far past its cap the key was billed, against the bound of docs/budgets.md.
Latency percentiles are over completed requests. The server's peak memory is its VmHWM
(/proc/PID/status, Linux): the high-water mark of its resident set since it started.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import MODEL, ROOT, cpu_seconds, pct, toy_upstream_process  # noqa: E402  (benchmarks/server.py)

MODES = {"bon4": {"w": 1, "k": 4}, "cbs": {"w": 2, "k": 2, "l": 4}}
UPSTREAM_ERRORS = {502: "upstream_error", 504: "upstream_timeout"}


# ------------------------------------------------------------------------------ the processes


def tiny_scorer(root: Path) -> dict[str, Any]:
    """The tiny random Llama pair, saved under `root`, as a `scorer:` config section."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tiny_model_dirs, cpu_scorer_config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dirs = build_tiny_model_dirs(root)
    return cpu_scorer_config(dirs.llama_tuned, dirs.llama_untuned, torch_threads=1).model_dump(mode="json")


def serve_config(upstream_url: str, args: argparse.Namespace, scorer: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "upstream": {"model": MODEL, "base_url": upstream_url, "timeout_s": args.upstream_timeout_s,
                     "max_attempts": args.max_attempts, "backoff_initial_s": 0.05, "backoff_max_s": 0.5,
                     "max_concurrency": 256},
        **({"scorer": scorer} if scorer else {}),
        "server": {"host": "127.0.0.1", "port": 0, "modes": MODES if scorer else {},
                   "caps": {"min_l": 4, "max_tokens": 64},
                   "max_concurrent_requests": max(64, 2 * args.concurrency)},
    }


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    base_url: str

    @property
    def peak_rss_mib(self) -> float:
        """VmHWM: the most resident memory the process has had (Linux; 0 elsewhere)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


@asynccontextmanager
async def w2s_serve(config: dict[str, Any], workdir: Path) -> AsyncIterator[ServeProcess]:
    """`w2s serve` in its own process, until ready (the scorer loaded); SIGTERM at the end."""
    path = workdir / "load.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "unused")}
    log = workdir / "serve.log"  # its warnings (every upstream retry is one) would drown the table
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "serve", "--config", str(path), cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=stderr)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        if not line.startswith("w2s: serving "):
            raise RuntimeError(f"w2s serve did not start: {line!r}\n{log.read_text()[-3000:]}")
        served = ServeProcess(proc, line.split()[2])
        root = served.base_url.removesuffix("/v1")
        async with aiohttp.ClientSession() as s:
            for _ in range(1200):
                async with s.get(root + "/health/ready") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("w2s serve was not ready within 120 s")
        yield served
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)


# ------------------------------------------------------------------------------ the load


@dataclass
class Outcome:
    kind: str  # completed, failed, lost
    latency_s: float
    detail: str = ""


def request_body(i: int, mode: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    rng = random.Random(args.seed * 1_000_003 + i)
    chat = rng.random() < args.chat_fraction
    body: dict[str, Any] = {"model": MODEL if mode == "plain" else f"{MODEL}+{mode}", "seed": i,
                            "max_tokens": rng.randint(max(1, args.max_tokens // 2), args.max_tokens)}
    if rng.random() < args.stream_fraction:
        body.update(stream=True, stream_options={"include_usage": True})
    if chat:
        body["messages"] = [{"role": "user", "content": f"Tell story {i} about a cat."}]
        return "/chat/completions", body
    body["prompt"] = f"Story {i}: the dog sat on"
    return "/completions", body


def _clear_error(body: object, codes: set[str]) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and error["code"] in codes and bool(error["message"]))


def classify(status: int, raw: bytes, streamed: bool) -> tuple[str, str]:
    if status != 200:
        try:
            body = json.loads(raw)
        except ValueError:
            return "lost", f"HTTP {status}, not JSON"
        if status in UPSTREAM_ERRORS and _clear_error(body, {UPSTREAM_ERRORS[status]}):
            return "failed", f"HTTP {status}"
        return "lost", f"HTTP {status}: {raw[:200]!r}"
    if not streamed:
        try:
            body = json.loads(raw)
            ok = len(body["choices"]) == 1 and body["choices"][0]["finish_reason"] in ("stop", "length")
        except (ValueError, KeyError, TypeError):
            ok = False
        return ("completed", "") if ok else ("lost", f"malformed 200: {raw[:200]!r}")
    # Data events only (": keepalive" comments are skipped, as clients do). An error event ends
    # the stream: the server sends no [DONE] after it.
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    try:
        chunks = [json.loads(e) for e in events if e != b"[DONE]"]
    except ValueError:
        return "lost", f"an event that is not JSON: {raw[-200:]!r}"
    if any("error" in c for c in chunks):
        error = next(c for c in chunks if "error" in c)
        return ("failed", "in-band") if _clear_error(error, set(UPSTREAM_ERRORS.values())) else (
            "lost", f"in-band error: {error}")
    if not events or events[-1] != b"[DONE]":
        return "lost", f"stream without [DONE]: {raw[-200:]!r}"
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    return ("completed", "") if finishes and finishes[-1] in ("stop", "length") else ("lost", "no finish reason")


async def fire(url: str, args: argparse.Namespace) -> tuple[list[Outcome], float, Counter[str]]:
    rng = random.Random(args.seed)
    weights = {name: float(w) for name, w in (part.split("=") for part in args.mix.split(","))}
    modes = rng.choices(list(weights), weights=list(weights.values()), k=args.requests)
    gate = asyncio.Semaphore(args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)

    async def one(session: aiohttp.ClientSession, i: int) -> Outcome:
        path, body = request_body(i, modes[i], args)
        async with gate:
            t0 = time.perf_counter()
            try:
                async with session.post(url + path, json=body, timeout=timeout) as r:
                    status, raw = r.status, await r.read()
            except asyncio.TimeoutError:
                return Outcome("lost", time.perf_counter() - t0, "no answer in time")
            except aiohttp.ClientError as e:
                return Outcome("lost", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
            kind, detail = classify(status, raw, bool(body.get("stream")))
            return Outcome(kind, time.perf_counter() - t0, detail)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(session, i) for i in range(args.requests)))
        return list(outcomes), time.perf_counter() - t0, Counter(modes)


async def upstream_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url.removesuffix("/v1") + "/toy/stats") as r:
            return await r.json()


async def budget_overshoot(args: argparse.Namespace, workdir: Path, requests: int = 100,
                           cap_tokens: int = 300, max_tokens: int = 16) -> str:
    """`requests` concurrent plain requests on one proxy key with a `cap_tokens` budget, against a
    fault-free toy upstream: what got in, what was billed, and how far past the cap (docs/budgets.md)."""
    os.environ["W2S_LOAD_KEYS"] = "load-key"
    async with toy_upstream_process("--latency-s", str(args.latency_s)) as upstream:
        config = serve_config(upstream.url, args, None)
        config["server"].update(api_keys_env="W2S_LOAD_KEYS", key_budget_tokens=cap_tokens,
                                max_concurrent_requests=2 * requests)
        async with w2s_serve(config, workdir) as served:
            async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, dict[str, Any]]:
                body = {"model": MODEL, "prompt": f"Story {i}: the dog sat on", "max_tokens": max_tokens, "seed": i}
                async with session.post(served.base_url + "/completions", json=body,
                                        headers={"Authorization": "Bearer load-key"}) as r:
                    return r.status, await r.json()

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                answers = await asyncio.gather(*(one(session, i) for i in range(requests)))
    ok = [b["usage"] for status, b in answers if status == 200]
    refused = sum(1 for status, b in answers if status == 429 and b["error"]["code"] == "insufficient_quota")
    billed = sum(u["total_tokens"] for u in ok)
    prompt = max((u["prompt_tokens"] for u in ok), default=0)
    bound = cap_tokens // max_tokens * prompt
    return (f"budget: {requests} concurrent requests on one key, cap {cap_tokens} tokens: {len(ok)} answered, "
            f"{refused} refused (429 insufficient_quota), {len(answers) - len(ok) - refused} other; billed "
            f"{billed} tokens, overshoot {max(0, billed - cap_tokens)} tokens ({max(0, billed - cap_tokens) / cap_tokens:.0%}),"
            f" bound {bound} (cap // step bound {max_tokens} x prompt {prompt})")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--fault-rate", type=float, default=0.2, help="fraction of upstream requests answered with a fault")
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--latency-s", type=float, default=0.05, help="the upstream's latency per request")
    p.add_argument("--mix", default="plain=1,bon4=1,cbs=1", help="request modes and their weights")
    p.add_argument("--scorer", choices=["tiny", "none"], default="tiny",
                   help="tiny: a tiny random Llama pair on the CPU; none: plain sampling only")
    p.add_argument("--chat-fraction", type=float, default=0.5)
    p.add_argument("--stream-fraction", type=float, default=0.25)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--upstream-timeout-s", type=float, default=1.0, help="hangs become retries after this")
    p.add_argument("--max-attempts", type=int, default=6)
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="a request unanswered by then is lost")
    p.add_argument("--seed", type=int, default=0, help="seeds the request mix")
    args = p.parse_args()
    if args.scorer == "none" and args.mix != "plain=1":
        args.mix = "plain=1"
        print("--scorer none: plain sampling only (--mix plain=1)")

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        scorer = await asyncio.to_thread(tiny_scorer, Path(tmp)) if args.scorer == "tiny" else None
        async with toy_upstream_process("--latency-s", str(args.latency_s), "--fault-rate", str(args.fault_rate),
                                        "--fault-seed", str(args.fault_seed)) as upstream:
            async with w2s_serve(serve_config(upstream.url, args, scorer), Path(tmp)) as served:
                rss_idle = served.peak_rss_mib
                cpu0 = cpu_seconds(served.proc.pid)
                outcomes, makespan, modes = await fire(served.base_url, args)
                cpu = cpu_seconds(served.proc.pid) - cpu0
                rss_peak = served.peak_rss_mib
                stats = await upstream_stats(upstream.url)
        overshoot = await budget_overshoot(args, Path(tmp))

    counts = Counter(o.kind for o in outcomes)
    done = [o.latency_s for o in outcomes if o.kind == "completed"]
    print(f"\n## Load: {args.requests} requests, {args.concurrency} concurrent, mix {dict(modes)}, "
          f"upstream latency {args.latency_s * 1e3:.0f} ms, fault rate {args.fault_rate:.0%}, "
          f"scorer {args.scorer}\n")
    print("| requests | completed | failed (clear errors) | lost | p50 s | p99 s | makespan s | req/s "
          "| server CPU ms/request | server peak RSS MiB (idle) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    p50 = f"{pct(done, 50):.3f}" if done else "-"
    p99 = f"{pct(done, 99):.3f}" if done else "-"
    print(f"| {len(outcomes)} | {counts['completed']} | {counts['failed']} | {counts['lost']} | {p50} | {p99} "
          f"| {makespan:.2f} | {len(outcomes) / makespan:.1f} | {cpu / len(outcomes) * 1e3:.1f} "
          f"| {rss_peak:.0f} ({rss_idle:.0f}) |")
    injected = stats.get("injected", {})
    print(f"\nupstream: {stats.get('requests')} requests, {stats.get('completed')} answered, "
          f"{sum(injected.values())} faults injected: "
          + ", ".join(f"{k} {v}" for k, v in sorted(injected.items(), key=lambda kv: -kv[1])))
    for o in [o for o in outcomes if o.kind == "lost"][:5]:
        print(f"lost: {o.detail}")
    print(f"\n{overshoot}")


if __name__ == "__main__":
    asyncio.run(main())
