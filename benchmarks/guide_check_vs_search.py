"""Does the guide check predict the search? (issue 27, item 3) On the film-review task.

    .venv/bin/python benchmarks/guide_check_vs_search.py \\
        --results benchmarks/results/quality-2026-11-22-paper-start --output runs/guide-check-vs-search

1. Held-out preference pairs labelled by a judge, from the quality benchmark's recorded samples
   (16 Gemma 3 270M continuations per (opening, seed) of the TEST openings, which the tuned
   adapter never saw: it was trained on `train_openings.py`): per (opening, seed), the sample the
   labeller (VADER) likes most is `chosen`, the one it likes least `rejected`; the prompt is the
   opening. Pairs whose judge gap is under `--gap` or whose texts are the same are skipped.
   Written to `<output>/pairs-<labeller>.jsonl` and read back through `proxy.preferences`.
2. `proxy.guide_check.check_guide` (the search's own batched sessions, CPU, one torch thread) on
   those pairs for four guides: "tuned" (shipped DPO adapter vs parent), "contrast" (positive vs
   negative review prefix), "plain-contrast" (positive vs plain "A film review:" prefix, the
   contrast `proxy.film_reviews.guides` discarded) and "reversed-tuned" (the tuned pair with its
   sides swapped: its score is minus the tuned one, a control that should come last). With the
   labeller as judge (its margin correlations) and the other lexicon as a second judge.
3. Beside it, the search gains over base (sample 0), paired on (opening, seed), ± one s.e.
   clustered by opening:
   - best-of-16, for every guide, exactly: best-of-N picks the one of the recorded 16 samples the
     guide scores highest (ties to the first), so its judge gain needs only each guide's scores of
     those samples, scored as the benchmark scored them (their own `finished` flags). "tuned" and
     "contrast" use the scores recorded in results.jsonl (the numbers of report.json); "reversed-
     tuned" is minus the recorded tuned scores (score = log p_tuned - log p_untuned, so swapping
     the sides negates it exactly; the check's reversed scores are compared to minus the tuned
     ones as a test of that); "plain-contrast" is scored here.
   - CBS W4K4 L4 from the benchmark's report.json, for "tuned" and "contrast"; no CBS search was
     run for the other two ("not measured": a search per (opening, seed) costs about an hour of
     this machine per guide and seed).

Writes `<output>/pairs-*.jsonl`, `<output>/guide_check_vs_search.json` and `<output>/table.md`,
and prints the table. `--openings N` keeps the first N openings (a quick run).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.film_reviews.stats import Estimate, estimate, paired  # noqa: E402
from proxy.guide_check import GuideCheck, PairScore, check_guide, pearson, summarize  # noqa: E402
from proxy.guide_check_command import check_json  # noqa: E402
from proxy.preferences import PreferencePair, read_pairs  # noqa: E402

GUIDE_NAMES = ("tuned", "contrast", "plain-contrast", "reversed-tuned")
LABELS = {"tuned": "tuned (DPO adapter vs parent)", "contrast": "contrast (positive vs negative prefix)",
          "plain-contrast": "plain contrast (positive vs plain prefix)",
          "reversed-tuned": "reversed tuned (parent vs adapter)"}
CBS = "cbs-w4k4l4"
BON = 16
Key = tuple[int, int]


def load_results(path: Path) -> tuple[dict[Key, list[dict[str, Any]]], dict[tuple[str, int, int], list[float]]]:
    """(samples per (opening, seed), each recorded guide's scores of them) from results.jsonl."""
    samples: dict[Key, list[dict[str, Any]]] = {}
    scores: dict[tuple[str, int, int], list[float]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["kind"] == "samples":
            samples[(rec["opening"], rec["seed"])] = rec["samples"]
        elif rec["kind"] == "scores":
            scores[(rec["guide"], rec["opening"], rec["seed"])] = rec["scores"]
    return samples, scores


def judged_pairs(samples: Mapping[Key, Sequence[Mapping[str, Any]]], openings: Sequence[str],
                 judge: Callable[[str], float], gap: float) -> list[dict[str, Any]]:
    """Per (opening, seed) in order, the judge's favourite sample as chosen and its least favourite
    as rejected; none where their judge gap is under `gap`, the texts are the same or one is blank."""
    out = []
    for (i, seed) in sorted(samples):
        texts = [s["text"] for s in samples[(i, seed)]]
        values = [judge(t) for t in texts]
        best = max(range(len(texts)), key=lambda j: (values[j], -j))
        worst = min(range(len(texts)), key=lambda j: (values[j], j))
        chosen, rejected = texts[best], texts[worst]
        if values[best] - values[worst] < gap or chosen == rejected or not chosen.strip() or not rejected.strip():
            continue
        out.append({"prompt": openings[i], "chosen": chosen, "rejected": rejected, "opening": i, "seed": seed,
                    "judge_chosen": values[best], "judge_rejected": values[worst]})
    return out


def write_pairs(path: Path, pairs: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
    lines = [json.dumps({"meta": dict(meta)})] + [json.dumps(p) for p in pairs]
    path.write_text("\n".join(lines) + "\n")


def rejudge(check: GuideCheck, pairs: Sequence[PreferencePair], judge: Callable[[str], float],
            name: str) -> GuideCheck:
    """The same guide scores summarized against another judge of the responses."""
    by_line = {p.line: p for p in pairs}
    scores: list[PairScore] = []
    groups: dict[int, dict[str, tuple[float, float]]] = {}
    for s in check.scores:
        p = by_line[s.line]
        jc, jr = judge(p.chosen), judge(p.rejected)
        scores.append(replace(s, judge_chosen=jc, judge_rejected=jr))
        g = groups.setdefault(s.prompt, {})
        g[p.chosen], g[p.rejected] = (s.chosen, jc), (s.rejected, jr)
    return summarize(scores, check.skipped, name, [list(g.values()) for g in groups.values()])


def best_of(scores: Sequence[float], n: int) -> int:
    """The index best-of-n picks: the highest of the first n scores, ties to the first."""
    return max(range(min(n, len(scores))), key=lambda j: (scores[j], -j))


def bon_gain(samples: Mapping[Key, Sequence[Mapping[str, Any]]], scores: Mapping[Key, Sequence[float]],
             judge: Callable[[str], float], n: int = BON) -> Estimate:
    """Judge(best-of-n's pick) - judge(sample 0), paired on (opening, seed), clustered by opening."""
    keys = [k for k in samples if k in scores]
    picked = {k: judge(samples[k][best_of(scores[k], n)]["text"]) for k in keys}
    base = {k: judge(samples[k][0]["text"]) for k in keys}
    return paired(picked, base)


def within_r(samples: Mapping[Key, Sequence[Mapping[str, Any]]], scores: Mapping[Key, Sequence[float]],
             judge: Callable[[str], float]) -> Estimate:
    """Pearson r of the guide's and the judge's scores across the samples of one (opening, seed),
    its mean over them ± s.e. clustered by opening: how well the guide ranks what best-of-N picks
    from, not just the judge's two extremes."""
    values = {}
    for k in samples:
        if k in scores:
            r = pearson(scores[k], [judge(s["text"]) for s in samples[k]])
            if not math.isnan(r):
                values[k] = r
    return estimate(values)


def _est(e: Estimate) -> dict[str, float]:
    return {"mean": e.mean, "se": e.se, "clusters": e.clusters, "n": e.n}


def _fmt(e: Mapping[str, float] | None, digits: int = 3) -> str:
    if e is None:
        return "not measured"
    if e["mean"] is None or (isinstance(e["mean"], float) and math.isnan(e["mean"])):
        return "n/a"
    se = e["se"]
    return f"{e['mean']:+.{digits}f} ± " + ("n/a" if se is None or math.isnan(se) else f"{se:.{digits}f}")


def _rate(r: Mapping[str, Any]) -> str:
    return f"{r['rate']:.3f} [{r['low']:.2f}, {r['high']:.2f}]"


def ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Rank 1 = largest; ties share the mean rank."""
    order = sorted(values, key=lambda g: -values[g])
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for g in order[i:j + 1]:
            out[g] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    keys = [k for k in a if k in b]
    if len(keys) < 2:
        return math.nan
    ra, rb = ranks({k: a[k] for k in keys}), ranks({k: b[k] for k in keys})
    ma, mb = sum(ra.values()) / len(keys), sum(rb.values()) / len(keys)
    sab = sum((ra[k] - ma) * (rb[k] - mb) for k in keys)
    saa, sbb = sum((ra[k] - ma) ** 2 for k in keys), sum((rb[k] - mb) ** 2 for k in keys)
    return sab / math.sqrt(saa * sbb) if saa > 0 and sbb > 0 else math.nan


def format_table(report: Mapping[str, Any]) -> str:
    lab, other = report["labeller"], report["second_judge"]
    rows = [f"Guide check on {report['pairs']} {lab.upper() if lab == 'vader' else lab}-labelled pairs "
            f"({report['prompts']} test openings; gap >= {report['gap']}) beside the search gains over base "
            f"(sample 0), paired on {report['keys']} (opening, seed), ± one s.e. clustered by opening:", "",
            "| guide | check accuracy [95% CI] | mean margin | chosen shorter: accuracy | "
            f"{other} agrees with guide | r with {lab} over the 16 samples | BoN-16 − base {lab} | BoN-16 − base {other} | "
            f"CBS W4K4 L4 − base {lab} | CBS W4K4 L4 − base {other} |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g, r in report["guides"].items():
        c = r["check"]
        shorter = next((b for b in c["by_length_difference"] if b["label"] == "chosen shorter"), None)
        rows.append(f"| {LABELS[g]} | {_rate(c['accuracy'])} | {_fmt(c['margin'], 2)} | "
                    f"{_rate(shorter['accuracy']) + ' (n ' + str(shorter['accuracy']['n']) + ')' if shorter else 'n/a'} | "
                    f"{_rate(r['second_judge']['agreement'])} | {_fmt(r['sample_r'][lab], 2)} | "
                    f"{_fmt(r['bon16'][lab])} | {_fmt(r['bon16'][other])} | "
                    f"{_fmt(r['cbs'][lab] if r['cbs'] else None)} | {_fmt(r['cbs'][other] if r['cbs'] else None)} |")
    rows.append("")
    a = report["agreement"]
    rows.append("Ranking (1 = best): check accuracy " + ", ".join(f"{g} {k:g}" for g, k in a["ranks"]["check"].items()))
    for name in ("sample_r_" + lab, "bon16_" + lab, "bon16_" + other, "cbs_" + lab, "cbs_" + other):
        rows.append(f"  {name.replace('sample_r_', 'r over the samples with ').replace('_', ' − base ')}: " + ", ".join(f"{g} {k:g}" for g, k in a["ranks"][name].items())
                    + f"; Spearman with the check {a['spearman'][name]:+.2f}")
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> int:
    from proxy.film_reviews.guide_model import fetch_demo_model
    from proxy.film_reviews.guides import contrast_guide, plain_contrast_guide, reversed_guide, shipped_adapter, tuned_guide
    from proxy.film_reviews.judges import JUDGES
    from proxy.film_reviews.openings import TEST_OPENINGS
    from scorers.registry import open_scorer, set_torch_threads

    t0 = time.perf_counter()
    results_dir, out = Path(args.results), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    samples, recorded = load_results(results_dir / "results.jsonl")
    samples = {k: v for k, v in samples.items() if args.openings is None or k[0] < args.openings}
    report_json = json.loads((results_dir / "report.json").read_text())
    lab, other = args.labeller, next(j for j in JUDGES if j != args.labeller)
    judge, judge2 = JUDGES[lab], JUDGES[other]

    rows = judged_pairs(samples, TEST_OPENINGS, judge, args.gap)
    pairs_path = out / f"pairs-{lab}.jsonl"
    write_pairs(pairs_path, rows, {"source": str(results_dir / "results.jsonl"), "labeller": lab, "gap": args.gap,
                                   "openings": "TEST_OPENINGS", "of": len(samples)})
    pairs = read_pairs(pairs_path)
    print(f"{len(pairs)} {lab}-labelled pairs of {len(samples)} (opening, seed) (gap >= {args.gap}) -> {pairs_path}",
          file=sys.stderr)

    smol = fetch_demo_model()
    options: dict[str, Any] = {"device": "cpu", "dtype": "float32", "batch_size": 16}
    tuned = tuned_guide(smol, shipped_adapter(), **options)
    configs = {"tuned": tuned, "contrast": contrast_guide(smol, **options),
               "plain-contrast": plain_contrast_guide(smol, **options), "reversed-tuned": reversed_guide(tuned)}
    set_torch_threads(args.torch_threads)

    sample_scores: dict[str, dict[Key, list[float]]] = {}
    sources: dict[str, str] = {}
    for g in ("tuned", "contrast"):
        sample_scores[g] = {k: recorded[(g, *k)] for k in samples if (g, *k) in recorded}
        sources[g] = "recorded (results.jsonl)"
    sample_scores["reversed-tuned"] = {k: [-x for x in v] for k, v in sample_scores["tuned"].items()}
    sources["reversed-tuned"] = "minus the recorded tuned scores"

    checks: dict[str, GuideCheck] = {}
    timings: dict[str, dict[str, float]] = {}
    for g in GUIDE_NAMES:
        started = time.perf_counter()
        scorer = await open_scorer(configs[g])
        loaded = time.perf_counter()
        done = [0]

        def advance(n: int, g: str = g) -> None:
            done[0] += n
            print(f"\r{g}: guide check {done[0]}/{len(pairs)} pairs", end="", file=sys.stderr, flush=True)

        try:
            checks[g] = await check_guide(scorer, pairs, judge, judge_name=lab, batch=args.batch, progress=advance)
            checked = time.perf_counter()
            print(f" ({checked - loaded:.0f}s)", file=sys.stderr)
            if g not in sample_scores:
                keys = sorted(samples)
                scored: dict[Key, list[float]] = {}
                gate = asyncio.Semaphore(args.batch)

                async def one(k: Key) -> None:
                    texts = [s["text"] for s in samples[k]]
                    async with gate:
                        with scorer.open(TEST_OPENINGS[k[0]]) as session:
                            scored[k] = await session.score(texts, [s["finished"] for s in samples[k]])
                    print(f"\r{g}: scoring the samples {len(scored)}/{len(keys)} (opening, seed)", end="",
                          file=sys.stderr, flush=True)

                await asyncio.gather(*(one(k) for k in keys))
                sample_scores[g] = scored
                sources[g] = "scored here"
                print(f" ({time.perf_counter() - checked:.0f}s)", file=sys.stderr)
        finally:
            await scorer.aclose()
        timings[g] = {"load_s": round(loaded - started, 1), "check_s": round(checked - loaded, 1),
                      "samples_s": round(time.perf_counter() - checked, 1)}

    # The reversed pair is the tuned one negated: its check scores should be minus the tuned ones.
    t_by_line = {s.line: s for s in checks["tuned"].scores}
    negation_gap = max(max(abs(s.chosen + t_by_line[s.line].chosen), abs(s.rejected + t_by_line[s.line].rejected))
                       for s in checks["reversed-tuned"].scores)

    report: dict[str, Any] = {
        "command": " ".join(sys.argv), "results": str(results_dir), "labeller": lab, "second_judge": other,
        "gap": args.gap, "pairs": len(pairs), "prompts": len({p.prompt for p in pairs}), "keys": len(samples),
        "pairs_file": pairs_path.name, "torch_threads": args.torch_threads,
        "reversed_minus_tuned_max_abs": negation_gap, "guides": {}, "timings": timings}
    for g in GUIDE_NAMES:
        methods = report_json["guides"].get(g, {}).get("methods", {})
        bon = {j: _est(bon_gain(samples, sample_scores[g], JUDGES[j])) for j in (lab, other)}
        recorded_bon = {j: methods[f"bon{BON}"][f"{j}_vs_base"] for j in (lab, other)} if methods else None
        report["guides"][g] = {
            "config": configs[g].model_dump(mode="json", exclude_none=True),
            "check": check_json(checks[g], guide=g) | {"scores": None},
            "second_judge": json.loads(json.dumps(check_json(rejudge(checks[g], pairs, judge2, other))["judge"])),
            "sample_scores": sources[g],
            "bon16": bon,
            "sample_r": {j: _est(within_r(samples, sample_scores[g], JUDGES[j])) for j in (lab, other)},
            "bon16_report_json": recorded_bon if args.openings is None else None,
            "cbs": {j: methods[CBS][f"{j}_vs_base"] for j in (lab, other)} if methods and CBS in methods else None,
        }
    acc = {g: r["check"]["accuracy"]["rate"] for g, r in report["guides"].items()}
    series = {f"sample_r_{j}": {g: r["sample_r"][j]["mean"] for g, r in report["guides"].items()} for j in (lab, other)}
    series |= {f"bon16_{j}": {g: r["bon16"][j]["mean"] for g, r in report["guides"].items()} for j in (lab, other)}
    series |= {f"cbs_{j}": {g: r["cbs"][j]["mean"] for g, r in report["guides"].items() if r["cbs"]} for j in (lab, other)}
    report["agreement"] = {"ranks": {"check": ranks(acc)} | {k: ranks(v) for k, v in series.items()},
                           "spearman": {k: spearman(acc, v) for k, v in series.items()}}
    if "plain-contrast" in sources and sources["plain-contrast"] == "scored here":
        (out / "plain-contrast-sample-scores.jsonl").write_text("".join(
            json.dumps({"opening": k[0], "seed": k[1], "scores": v}) + "\n"
            for k, v in sorted(sample_scores["plain-contrast"].items())))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    table = format_table(report)
    print(table)
    print(f"\nreversed-tuned check scores vs minus tuned: max |difference| {negation_gap:.2e}; "
          f"wall time {report['wall_s']:.0f}s")
    (out / "guide_check_vs_search.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out / 'guide_check_vs_search.json'}, {out / 'table.md'}, {pairs_path}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="benchmarks/results/quality-2026-11-22-paper-start",
                   help="a quality-benchmark directory (results.jsonl with samples and scores, report.json)")
    p.add_argument("--output", required=True, help="where the pairs, the JSON and the table go")
    p.add_argument("--labeller", choices=("vader", "textblob"), default="vader",
                   help="the judge that labels the pairs (the other is the second judge)")
    p.add_argument("--gap", type=float, default=0.3, help="least judge gap between chosen and rejected")
    p.add_argument("--openings", type=int, help="only the first N openings (a quick run)")
    p.add_argument("--batch", type=int, default=16, help="sessions scored at once")
    p.add_argument("--torch-threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
