"""Weak-to-strong quality across vocabularies: film-review continuation, after the paper's
controlled-sentiment experiment.

    .venv/bin/python benchmarks/quality.py --output runs/quality              # the full run (~3.3 h here)
    .venv/bin/python benchmarks/quality.py --output runs/quality --seeds 1    # its first seed (~65 min)
    .venv/bin/python benchmarks/quality.py --output runs/quality --report     # table + plot from what is there
    .venv/bin/python benchmarks/quality.py --output runs/q-small --openings 20 --seeds 1 --guides contrast

The black box is Gemma 3 270M, a *base* model with a 262k-token vocabulary (GGUF from PyPI,
`proxy.film_reviews.models`), served by the real `w2s serve-local` in a subprocess on 127.0.0.1
and reached through `OpenAICompletionsUpstream` with the raw template "{instruction}": it
continues the openings of film reviews (`proxy.film_reviews.openings`, neutral, mid-sentence).
The guides are SmolLM2-135M-Instruct pairs (49k vocabulary: they score Gemma's text re-tokenized)
wanting a positive review (`proxy.film_reviews.guides`): "contrast" (one model, a positive vs a
negative review prefix) and "tuned" (the shipped DPO adapter vs its parent; VADER labelled its training
pairs). The judges never guide: VADER and TextBlob, on the continuation alone.

Methods per (opening, seed): base, best-of-N for N = 1, 2, 4, ... up to `--bon-max` (16), CBS at
W2K2 and W4K4 for each chunk length L, and any CBS variants named by `--extra-methods` (a
horizon, a sample schedule: `Method.parse`), all as the paper's reference code runs them: the first step draws W·K
chunks from the prompt and keeps W (`narrow_start` off), and selection is by score alone
(`prefer_finished` off). settings.json records that start (`cbs_start`); a directory made before
it was recorded holds searches that drew K first chunks, and is refused.

What it costs, and what was done about it. Everything here is compute-bound on 2 CPU cores
(AVX2, fp32): a Gemma token costs ~268M multiply-adds (63% of it the 262k-row output layer), a
token scored by a guide ~268M (both sides of the pair), and the measured rate is 13-19 GMAC per
CPU second. Per (opening, seed) at the defaults (16 new tokens, L = 4 and 8, both guides) that is
~1200 sampled tokens, ~1500 re-sent prompt tokens and ~1500 scored tokens: ~65 CPU s, ~40 s of
wall time on 2 cores (an estimate from that count, calibrated on a measured run: 20 openings,
one guide, 32 new tokens, L = 8 and 16, took 1330 CPU s after start-up). So one seed of 100
openings takes about 65 minutes here, and the issue's three seeds about 3.3 hours: the hour the
issue asks for buys one seed, not three. The run is resumable and goes seed by seed, so
`--seeds 1` is the one-hour run and `--seeds 3` on the same directory later adds the rest.
- Best-of-N for every N is read off ONE `--bon-max`-sample request per (opening, seed): serve-local seeds
  each sample from (seed, prompt, sample index), so the first N of those samples are exactly
  the samples a `search(w=1, k=N)` with that seed would have drawn, and best-of-N is the one of
  them the guide scores highest (ties to the first, as the search's stable sort does); base is
  sample 0. Upstream tokens are accounted as what each method would have used (the prompt once
  plus its N samples). The samples are scored by every guide, so the other guide costs no
  new sampling. CBS needs real searches per guide.
- The same seed in CBS gives its first step's W·K samples the same random draws as the first W·K
  of them (common random numbers: the paired differences have less noise).
- serve-local decodes every request in flight in one padded batch of up to 64 rows, each prompt
  run once however many samples it has (`proxy.local.causal_lm`): 48 tokens/s in batches of 64 rows
  against 26 tokens/s for one n=16 request and 6 for n=1 (1 thread). The runner keeps many
  searches in flight (`--concurrency`) and goes phase by phase (the samples, each scored by
  both guides as soon as it is there; then CBS a chunk length at a time, both guides together),
  so sampling and scoring overlap and a batch's rows want the same number of tokens.
- Threads: serve-local and the guides get one torch thread each (`--upstream-threads`,
  `--torch-threads`), so the two processes do not oversubscribe the two cores.

Resumable: every result goes to `<output>/results.jsonl` as soon as it exists (samples per
(opening, seed); each guide's scores of them; each CBS search), a run skips what is there, and
the report is computed from that file alone; `settings.json` refuses a directory whose results
were made with other settings. Seeds run in order, so a run cut short leaves whole seeds.

The report: per guide, method | upstream tokens per opening | guide score | VADER and TextBlob
mean ± s.e. | VADER and TextBlob minus base, paired on (opening, seed) ± s.e.; then CBS minus
best-of-N at matched samples (W2K2 vs BoN-4, W4K4 vs BoN-16: the same completion tokens where
no answer finishes early, though CBS pays for re-sending the prompt and the answer so far at
every step), paired; then the judges as N (best-of-N) and W*K (CBS) grow; then, where every search recorded its tree
(`tree`, since 2026-12-07), the same in dollars under each price list of benchmarks/billing.py
(each method's exact requests under that provider's prices, `n` support and cache rule, also
behind a long shared system prompt: `--system-tokens`), benchmarks/quality_dollars.py. Standard errors are clustered by opening (the seeds of one
opening are averaged first). `report.json` and `quality.png` (judge vs upstream tokens, one
point per method with error bars, a panel per guide and judge) go next to the results.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.config import OpenAICompletionsConfig, SearchConfig  # noqa: E402
from proxy.film_reviews.guides import BON_SIZES, CBS_SHAPES, CONTROL_GUIDES, GUIDES, Method, bon_methods, cbs_methods  # noqa: E402
from proxy.film_reviews.stats import Estimate, estimate, paired  # noqa: E402
from proxy.film_reviews.judges import JUDGES  # noqa: E402
from benchmarks.billing import Request, Tokenize, sample_requests, tree_requests  # noqa: E402
from benchmarks.quality_dollars import dollars_section, format_dollars, z_text  # noqa: E402
from proxy.search import search  # noqa: E402
from proxy.types import Conversation, SamplingParams, derive_seed  # noqa: E402
from proxy.upstreams.base import Upstream  # noqa: E402
from scorers.base import Scorer  # noqa: E402

RESULTS = "results.jsonl"
Key = tuple[int, int]
"""(opening index, seed)."""


@dataclass(frozen=True)
class Settings:
    """What the results depend on (kept in settings.json); counts can grow between runs."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    chunk_lengths: tuple[int, ...] = (4, 8)
    openings: int = 100
    seeds: int = 3
    extra_methods: tuple[str, ...] = ()
    """CBS variants (a horizon, a sample schedule: `Method.parse` names) run beside the grid."""
    bon_max: int = max(BON_SIZES)
    """Samples drawn per (opening, seed); best-of-N for every power of two up to it. Not part of
    the identity: serve-local seeds each sample by its index, so a larger `bon_max` extends the
    samples already there (checked: the first ones must come back identical)."""

    @property
    def bon_sizes(self) -> tuple[int, ...]:
        return tuple(2 ** i for i in range(self.bon_max.bit_length()) if 2 ** i <= self.bon_max)

    def identity(self) -> dict[str, Any]:
        """The searches run with SearchConfig's defaults, so the start recorded is the default's:
        flipping `narrow_start`'s default makes every earlier directory refuse to be resumed."""
        start = "k" if SearchConfig().narrow_start else "w*k"
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "cbs_start": start}


# ---------------------------------------------------------------- results file

class Results:
    """The JSONL of everything done so far, indexed; appends are flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples: dict[Key, dict[str, Any]] = {}
        self.scores: dict[tuple[str, int, int], list[float]] = {}
        self.searches: dict[tuple[str, str, int, int], dict[str, Any]] = {}
        if path.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):  # a line cut short by a kill: end it, so the next starts clean
                with open(path, "a") as f:
                    f.write("\n")
            for line in text.splitlines():
                if line.strip():
                    try:
                        self._index(json.loads(line))
                    except json.JSONDecodeError:  # a line cut short by a kill: that item is redone
                        continue

    def _index(self, rec: dict[str, Any]) -> None:
        key = (rec["opening"], rec["seed"])
        if rec["kind"] == "samples":
            self.samples[key] = rec
        elif rec["kind"] == "scores":
            self.scores[(rec["guide"], *key)] = rec["scores"]
        elif rec["kind"] == "search":
            self.searches[(rec["guide"], rec["method"], *key)] = rec

    def add(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self._index(rec)


def check_settings(out: Path, identity: dict[str, Any]) -> None:
    """settings.json holds what the results depend on; a different run is refused."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != identity:
            diff = {k: (old.get(k), identity.get(k)) for k in set(old) | set(identity) if old.get(k) != identity.get(k)}
            raise SystemExit(f"{out} holds results made with other settings (was, now): {diff}; use another --output")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=1, sort_keys=True))


# ---------------------------------------------------------------- the run

@dataclass
class Job:
    phase: str
    run: Callable[[], Any]


class Runner:
    """Runs the missing items against an upstream and loaded guides, recording each at once."""

    def __init__(self, results: Results, settings: Settings, upstream: Upstream,
                 guides: Mapping[str, Scorer], openings: Sequence[str], *, concurrency: int = 32,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
        self.results, self.settings, self.upstream = results, settings, upstream
        self.guides, self.openings, self.concurrency, self.log = guides, openings, concurrency, log
        self.phase_s: dict[str, float] = {}
        self.phase_cpu_s: dict[str, float] = {}
        self.cpu_clock: Callable[[], float] = time.process_time
        """CPU seconds used so far by the processes doing the work (set to include serve-local's)."""

    async def _samples(self, i: int, seed: int) -> None:
        """The `bon_max` samples of (opening, seed) if missing (or fewer), then every guide's scores of them if missing."""
        s = self.settings
        had = self.results.samples.get((i, seed), {}).get("samples", [])
        if len(had) < s.bon_max:
            t0 = time.perf_counter()
            # Exactly the request search(w=1, k=bon_max, seed=seed) makes in its one step.
            params = SamplingParams(n=s.bon_max, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=1.0)
            res = await self.upstream.sample_batch(Conversation.instruction(self.openings[i]), [""], params,
                                                  seeds=[derive_seed(seed, 1, 0)])
            got = [{"text": c.text, "finished": c.finished, "tokens": c.num_tokens} for c in res.continuations]
            if got[: len(had)] != had:
                raise SystemExit(f"opening {i} seed {seed}: {s.bon_max} samples do not start with the {len(had)} "
                                 "recorded (the upstream's per-index seeding changed); use another --output")
            self.results.add({
                "kind": "samples", "opening": i, "seed": seed, "prompt_tokens": res.usage.prompt_tokens,
                "completion_tokens": res.usage.completion_tokens, "wall_s": round(time.perf_counter() - t0, 3),
                "samples": got,
            })
        samples = self.results.samples[(i, seed)]["samples"]
        for guide in self.guides:
            if len(self.results.scores.get((guide, i, seed), [])) >= len(samples):
                continue
            session = self.guides[guide].open(self.openings[i])
            try:
                scores = await session.score([x["text"] for x in samples], [x["finished"] for x in samples])
            finally:
                session.close()
            self.results.add({"kind": "scores", "guide": guide, "opening": i, "seed": seed, "scores": scores})

    async def _search(self, guide: str, method: Method, i: int, seed: int) -> None:
        s = self.settings
        cfg = method.search_config(max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=seed)
        r = await search(Conversation.instruction(self.openings[i]), self.upstream, self.guides[guide], cfg)
        self.results.add({
            "kind": "search", "guide": guide, "method": method.name, "opening": i, "seed": seed,
            "text": r.text, "finished": r.finished, "score": r.score, "tokens": r.tokens,
            "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
            "calls": r.calls, "steps": len(r.steps), "wall_s": round(r.wall_s, 3),
            # The search tree, [parent, step, chunk] per node (node 0 the empty root): the exact
            # requests it made follow from it (benchmarks/billing.py prices them per provider).
            "tree": [[c.parent, c.step, c.chunk] for c in sorted(r.nodes.values(), key=lambda c: c.id)],
        })

    def jobs(self, seed: int) -> list[Job]:
        """One seed's missing work in phases: the samples (each scored by every guide as soon as it
        is there, so sampling and scoring overlap), then CBS a chunk length at a time, both guides
        together (serve-local's batches then hold rows that want the same number of tokens)."""
        res, n = self.results, range(self.settings.openings)
        want = self.settings.bon_max
        out = [Job("samples", lambda i=i: self._samples(i, seed)) for i in n
               if len(res.samples.get((i, seed), {}).get("samples", [])) < want
               or any(len(res.scores.get((g, i, seed), [])) < want for g in self.guides)]
        for l in self.settings.chunk_lengths:
            out += [Job(f"cbs l{l}", lambda g=g, m=m, i=i: self._search(g, m, i, seed))
                    for i in n for g in self.guides for m in cbs_methods((l,))
                    if (g, m.name, i, seed) not in res.searches]
        out += [Job("variants", lambda g=g, m=m, i=i: self._search(g, m, i, seed))
                for i in n for g in self.guides for m in map(Method.parse, self.settings.extra_methods)
                if (g, m.name, i, seed) not in res.searches]
        return out

    async def run(self) -> None:
        for seed in range(self.settings.seeds):
            jobs = self.jobs(seed)
            phases = list(dict.fromkeys(j.phase for j in jobs))
            for phase in phases:
                todo = [j for j in jobs if j.phase == phase]
                t0, c0 = time.perf_counter(), self.cpu_clock()
                await self._run_all(todo, f"seed {seed} {phase}")
                self.phase_s[f"seed {seed} {phase}"] = time.perf_counter() - t0
                self.phase_cpu_s[f"seed {seed} {phase}"] = self.cpu_clock() - c0
                self.log(f"  seed {seed} {phase}: {len(todo)} items, {self.phase_s[f'seed {seed} {phase}']:.0f}s wall, "
                         f"{self.phase_cpu_s[f'seed {seed} {phase}']:.0f} CPU s (this process + serve-local)")

    async def _run_all(self, todo: list[Job], label: str) -> None:
        limit = asyncio.Semaphore(self.concurrency)
        done = 0
        t0 = time.perf_counter()

        async def one(job: Job) -> None:
            nonlocal done
            async with limit:
                await job.run()
            done += 1
            if done % max(1, len(todo) // 5) == 0 or done == len(todo):
                dt = time.perf_counter() - t0
                self.log(f"  {label}: {done}/{len(todo)} in {dt:.0f}s (eta {dt / done * (len(todo) - done):.0f}s)")

        await asyncio.gather(*(one(j) for j in todo))


# ---------------------------------------------------------------- the report

@dataclass
class Row:
    """One method's outcome on one (opening, seed) under one guide."""

    text: str
    score: float | None
    upstream_tokens: int
    """Prompt + completion tokens billed (CBS re-sends the prompt and the answer so far every step)."""
    completion_tokens: int
    requests: list[Request] | None = None
    """The exact requests made (None: a search recorded before its tree was)."""


def method_rows(results: Results, guide: str, methods: Iterable[Method]) -> dict[str, dict[Key, Row]]:
    """Every method's chosen answer per (opening, seed); best-of-N derived from the shared samples."""
    out: dict[str, dict[Key, Row]] = {}
    for m in methods:
        rows: dict[Key, Row] = {}
        if m.searched:
            for (g, name, i, seed), rec in results.searches.items():
                if g == guide and name == m.name:
                    rows[(i, seed)] = Row(rec["text"], rec["score"], rec["prompt_tokens"] + rec["completion_tokens"],
                                          rec["completion_tokens"], tree_requests(rec["tree"]) if "tree" in rec else None)
        else:
            for (i, seed), rec in results.samples.items():
                scores = results.scores.get((guide, i, seed))
                if scores is None or len(scores) < m.k or len(rec["samples"]) < m.k:
                    continue
                first = rec["samples"][: m.k]
                best = max(range(len(first)), key=lambda j: (scores[j], -j))
                completion = sum(x["tokens"] for x in first)
                rows[(i, seed)] = Row(first[best]["text"], scores[best], rec["prompt_tokens"] + completion, completion,
                                      sample_requests(x["text"] for x in first))
        out[m.name] = rows
    return out


def _est_dict(e: Estimate) -> dict[str, float]:
    return {"mean": e.mean, "se": e.se, "clusters": e.clusters, "n": e.n}


def summarize(results: Results, settings: Settings, guides: Sequence[str], *, instructions: Sequence[str] = (),
              tokenize: Tokenize | None = None, system_tokens: Sequence[int] = (0,)) -> dict[str, Any]:
    """Everything the table and the plot show, as plain data (written to report.json); with a
    tokenizer (and the openings), dollars under each price list too, where every method's
    requests were recorded."""
    methods = (bon_methods(settings.bon_sizes) + cbs_methods(settings.chunk_lengths)
               + [Method.parse(name) for name in settings.extra_methods])
    report: dict[str, Any] = {"settings": settings.__dict__ | {"chunk_lengths": list(settings.chunk_lengths)},
                              "judges": list(JUDGES), "guides": {}}
    for guide in guides:
        rows = method_rows(results, guide, methods)
        # Only (opening, seed) pairs every method has, so all rows compare like with like.
        common = set.intersection(*(set(r) for r in rows.values())) if rows else set()
        if not common:
            continue
        judged = {name: {k: {j: fn(r[k].text) for j, fn in JUDGES.items()} for k in common} for name, r in rows.items()}
        per_method: dict[str, Any] = {}
        for m in methods:
            r = rows[m.name]
            entry: dict[str, Any] = {
                "w": m.w, "k": m.k, "l": m.l, "breadth": m.breadth,
                "upstream_tokens": estimate({k: float(r[k].upstream_tokens) for k in common}).mean,
                "completion_tokens": estimate({k: float(r[k].completion_tokens) for k in common}).mean,
                "guide_score": _est_dict(estimate({k: float(r[k].score or 0.0) for k in common})),
            }
            for j in JUDGES:
                vals = {k: judged[m.name][k][j] for k in common}
                base = {k: judged["base"][k][j] for k in common}
                entry[j] = _est_dict(estimate(vals))
                entry[f"{j}_vs_base"] = _est_dict(paired(vals, base))
            per_method[m.name] = entry
        matched: dict[str, Any] = {}
        for m in cbs_methods(settings.chunk_lengths):
            bon = f"bon{m.breadth}"
            if bon in per_method:
                matched[f"{m.name} - {bon}"] = {
                    j: _est_dict(paired({k: judged[m.name][k][j] for k in common}, {k: judged[bon][k][j] for k in common}))
                    for j in JUDGES} | {"tokens": [per_method[x][t] for x in (m.name, bon)
                                                   for t in ("upstream_tokens", "completion_tokens")]}
        report["guides"][guide] = {"pairs": len(common), "openings": len({k[0] for k in common}),
                                   "seeds": len({k[1] for k in common}), "methods": per_method, "cbs_vs_bon": matched}
        requests = {name: {k: r[k].requests for k in common if r[k].requests is not None} for name, r in rows.items()}
        if tokenize is not None and instructions and all(len(r) == len(common) for r in requests.values()):
            report["guides"][guide]["dollars"] = dollars_section(
                requests, judged, common, instructions, tokenize, list(JUDGES), system_tokens)  # type: ignore[arg-type]
    return report


def _fmt(e: Mapping[str, float], digits: int = 3) -> str:
    if e["mean"] is None or math.isnan(e["mean"]):
        return "n/a"
    se = "n/a" if math.isnan(e["se"]) else f"{e['se']:.{digits}f}"
    return f"{e['mean']:+.{digits}f} ± {se}"


def format_report(report: Mapping[str, Any], chunk_lengths: Sequence[int]) -> str:
    out: list[str] = []
    headline = ["base", "bon4", "bon16"] + [m.name for m in cbs_methods(tuple(chunk_lengths))]
    for guide, g in report["guides"].items():
        ms = g["methods"]
        out.append(f"\n## guide: {guide}  ({g['openings']} openings x {g['seeds']} seed(s) = {g['pairs']} pairs; "
                   f"± is one standard error, clustered by opening)\n")
        out.append("| method | upstream tokens/opening (completion) | guide score | VADER | TextBlob | VADER - base "
                   "| TextBlob - base |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for name in headline + [n for n in ms if n not in headline]:
            m = ms[name]
            out.append(f"| {name} | {m['upstream_tokens']:.0f} ({m['completion_tokens']:.0f}) | "
                       f"{_fmt(m['guide_score'], 2)} | {_fmt(m['vader'])} | "
                       f"{_fmt(m['textblob'])} | {_fmt(m['vader_vs_base'])} | {_fmt(m['textblob_vs_base'])} |")
        out.append("\nCBS minus best-of-N with the same number of samples (paired; z = difference / s.e.):\n")
        out.append("| comparison | tokens, completion (CBS vs BoN) | VADER | z | TextBlob | z |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for name, c in g["cbs_vs_bon"].items():
            t = c["tokens"]
            out.append(f"| {name} | {t[0]:.0f} ({t[1]:.0f}) vs {t[2]:.0f} ({t[3]:.0f}) | "
                       f"{_fmt(c['vader'])} | {z_text(c['vader'])} | "
                       f"{_fmt(c['textblob'])} | {z_text(c['textblob'])} |")
        out.append("\nJudges as the search widens (over-optimization shows as a judge that stops rising or falls "
                   "while the guide score keeps rising):\n")
        out.append("| series | breadth (N or W*K) | guide score | VADER | TextBlob |")
        out.append("|---|---:|---:|---:|---:|")
        series = [("best-of-N", sorted((n for n in ms if ms[n]["l"] is None), key=lambda n: ms[n]["breadth"]))]
        for l in chunk_lengths:
            series.append((f"CBS L={l}", ["base"] + [f"cbs-w{w}k{k}l{l}" for w, k in CBS_SHAPES]))
        for label, names in series:
            for name in names:
                m = ms[name]
                out.append(f"| {label} | {m['breadth']} | {_fmt(m['guide_score'], 2)} | {_fmt(m['vader'])} | "
                           f"{_fmt(m['textblob'])} |")
        if "dollars" in g:
            out.append(f"\n## guide: {guide}, in dollars (each method's exact requests under each price list)")
            out.append(format_dollars(g["dollars"], list(JUDGES), guide))
    return "\n".join(out)


# ---------------------------------------------------------------- the black box and the guides

class ServedModel:
    """`w2s serve-local` in a subprocess on a free port of 127.0.0.1; stopped on exit."""

    def __init__(self, path: str, gguf_file: str | None, name: str, threads: int, startup_timeout_s: float = 1800) -> None:
        self.path, self.gguf_file, self.name, self.threads, self.timeout = path, gguf_file, name, threads, startup_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> "ServedModel":
        cmd = [sys.executable, "-m", "proxy.cli", "serve-local", self.path, "--name", self.name, "--port", "0",
               "--device", "cpu", "--dtype", "float32", "--torch-threads", str(self.threads)]
        if self.gguf_file:
            cmd += ["--gguf-file", self.gguf_file]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self.proc.stdout is not None
        t0 = time.monotonic()
        line = self.proc.stdout.readline()  # "serving PATH at URL" once the model is loaded
        if not line.startswith("serving "):
            self.__exit__()
            raise RuntimeError(f"serve-local did not start (exit {self.proc.returncode}); see its stderr above")
        self.base_url = line.split(" at ")[-1].strip()
        print(f"serve-local up in {time.monotonic() - t0:.0f}s at {self.base_url}", file=sys.stderr, flush=True)
        return self

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()  # type: ignore[union-attr]
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            return 0.0

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _adapter_digest(path: str | None) -> str | None:
    if not path:
        return None
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def check_guides(out: Path, configs: dict[str, Any]) -> None:
    """A guide's identity (prefixes, adapter weights) is fixed per directory, as the settings are:
    refuses a guide that changed since its results were recorded, and records new ones."""
    gpath = out / "guides.json"
    known = json.loads(gpath.read_text()) if gpath.is_file() else {}
    for name, cfg in configs.items():
        ident = cfg.model_dump(mode="json", include={"tuned", "untuned"})
        ident["adapter_sha"] = _adapter_digest(cfg.tuned.adapter)
        if name in known and _set_fields(known[name]) != _set_fields(ident):
            raise SystemExit(f"{out}: guide {name!r} changed since its results were recorded; use another --output")
        known[name] = ident
    out.mkdir(parents=True, exist_ok=True)
    gpath.write_text(json.dumps(known, indent=1, sort_keys=True))


def _set_fields(ident: Any) -> Any:
    """A guide's identity without its unset fields, so that a field added to ModelSpec later (unset,
    as every older guide has it) does not read as a changed guide."""
    if isinstance(ident, dict):
        return {k: _set_fields(v) for k, v in ident.items() if v is not None}
    return ident


def available_guides(names: Sequence[str]) -> dict[str, Any]:
    """ScorerConfigs of the guides asked for; an unavailable one is refused, saying why."""
    from proxy.film_reviews.guide_model import fetch_demo_model
    from proxy.film_reviews.guides import GuideUnavailable, guide_config

    smol = fetch_demo_model()
    out = {}
    for name in names:
        try:
            out[name] = guide_config(name, smol, device="cpu", dtype="float32", batch_size=16)
        except GuideUnavailable as e:
            raise SystemExit(f"guide {name!r}: {e}; run with --guides contrast to leave it out") from None
    return out


async def main_async(args: argparse.Namespace) -> int:
    from proxy.film_reviews.openings import TEST_OPENINGS
    from proxy.upstreams.openai_completions import OpenAICompletionsUpstream

    settings = Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        chunk_lengths=tuple(args.chunk_lengths), openings=args.openings, seeds=args.seeds,
                        bon_max=args.bon_max, extra_methods=tuple(args.extra_methods))
    if settings.openings > len(TEST_OPENINGS):
        raise SystemExit(f"--openings: at most {len(TEST_OPENINGS)}")
    out = Path(args.output)
    guide_names = [g for g in args.guides if g]
    configs = available_guides(guide_names) if not args.report else {}
    identity = settings.identity() | {
        "upstream": "gemma-3-270m q4_k_m (serve-local)", "openings_sha": hashlib.sha256(
            "\n".join(TEST_OPENINGS).encode()).hexdigest()[:16],
    }
    if not args.report:
        check_settings(out, identity)
        check_guides(out, configs)
    results = Results(out / RESULTS)

    if not args.report:
        from proxy.film_reviews.models import fetch_gemma3_270m
        from scorers.registry import open_scorer, set_torch_threads

        set_torch_threads(args.torch_threads)
        gemma = await asyncio.to_thread(fetch_gemma3_270m)
        t_start = time.perf_counter()
        with ServedModel(gemma.path, gemma.gguf_file, "gemma-3-270m", args.upstream_threads) as served:
            scorers = {}
            for name, cfg in configs.items():
                scorers[name] = await open_scorer(cfg)
            ucfg = OpenAICompletionsConfig(model="gemma-3-270m", base_url=served.base_url,
                                           prompt_template="{instruction}", max_concurrency=256, timeout_s=3600.0,
                                           max_attempts=2)
            async with OpenAICompletionsUpstream(ucfg) as upstream:
                runner = Runner(results, settings, upstream, scorers, TEST_OPENINGS, concurrency=args.concurrency)
                runner.cpu_clock = lambda: time.process_time() + served.cpu_s()
                try:
                    await runner.run()
                finally:
                    for sc in scorers.values():
                        await sc.aclose()
            total = time.perf_counter() - t_start
            print("\nwall time by phase: " + ", ".join(f"{k} {v:.0f}s ({runner.phase_cpu_s[k]:.0f} CPU s)"
                                                      for k, v in runner.phase_s.items())
                  + f"; total {total:.0f}s (with start-up)", file=sys.stderr)
            if upstream.usage.completion_tokens and runner.phase_s:
                print(f"upstream: {upstream.api_calls} calls, {upstream.usage.prompt_tokens} prompt + "
                      f"{upstream.usage.completion_tokens} completion tokens", file=sys.stderr)

    if args.report:  # the report describes what the directory holds, whatever the flags say
        saved = json.loads((out / "settings.json").read_text()) if (out / "settings.json").is_file() else {}
        searched = {Method.parse(name) for (_, name, _, _) in results.searches}
        lengths = sorted({m.l for m in searched if not m.variant and m.l}) or settings.chunk_lengths
        settings = Settings(max_new_tokens=saved.get("max_new_tokens", settings.max_new_tokens),
                            temperature=saved.get("temperature", settings.temperature), chunk_lengths=tuple(lengths),
                            openings=len({k[0] for k in results.samples}), seeds=len({k[1] for k in results.samples}),
                            extra_methods=tuple(sorted(m.name for m in searched if m.variant)),
                            bon_max=min((len(r["samples"]) for r in results.samples.values()), default=settings.bon_max))
    tokenize = None
    if args.dollars and any("tree" in rec for rec in results.searches.values()):
        from benchmarks.quality_dollars import gemma_tokenizer

        tokenize = gemma_tokenizer()
    recorded = {g for (g, *_rest) in results.scores}
    report = summarize(results, settings, [g for g in GUIDES + CONTROL_GUIDES
                                           if g in guide_names or (args.report and g in recorded)],
                       instructions=TEST_OPENINGS, tokenize=tokenize, system_tokens=args.system_tokens)
    if not report["guides"]:
        print("no complete results yet", file=sys.stderr)
        return 1
    print(format_report(report, settings.chunk_lengths))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    from benchmarks.quality_plot import plot_report

    plot_report(report, out / "quality.png")
    written = [out / "report.json", out / "quality.png"]
    if any("dollars" in g for g in report["guides"].values()):
        from benchmarks.quality_plot import plot_dollars

        written.append(plot_dollars(report, out / "quality-dollars.png"))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/quality", help="results directory (resumable)")
    p.add_argument("--guides", type=lambda s: s.split(","), default=list(GUIDES),
                   help="comma-separated: contrast,tuned (and the controls plain-contrast,reversed)")
    p.add_argument("--openings", type=int, default=d.openings)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--chunk-lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(d.chunk_lengths))
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--extra-methods", type=lambda s: [Method.parse(x).name for x in s.split(",") if x], default=[],
                   help="CBS variants to run beside the grid, e.g. cbs-w4k4l8-h16,cbs-w4k4l8-s16.4 (a horizon of "
                        "16 tokens; 16 samples at the first step, then 4)")
    p.add_argument("--bon-max", type=int, default=d.bon_max,
                   help="samples per (opening, seed): best-of-N up to this N (a larger one extends a run)")
    p.add_argument("--concurrency", type=int, default=64, help="searches in flight")
    p.add_argument("--torch-threads", type=int, default=1, help="the guides' CPU threads")
    p.add_argument("--upstream-threads", type=int, default=1, help="serve-local's CPU threads")
    p.add_argument("--report", action="store_true", help="only print the report from the results there")
    p.add_argument("--no-dollars", dest="dollars", action="store_false",
                   help="leave out the dollars section (it loads the black box's tokenizer)")
    p.add_argument("--system-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[0, 6000],
                   help="price the requests behind system prompts of these lengths too (0: as run; 6000 is "
                        "above Anthropic's Haiku 4.5 cache minimum, also as the family counts it)")
    args = p.parse_args(argv)
    unknown = set(args.guides) - set(GUIDES + CONTROL_GUIDES)
    if unknown:
        p.error(f"--guides: unknown {sorted(unknown)} (known: {', '.join(GUIDES + CONTROL_GUIDES)})")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that `kill` stops serve-local too (the context managers run)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
