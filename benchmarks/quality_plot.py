"""The quality benchmark's figure: judge score against upstream tokens, one point per method.

A panel per (guide, judge); error bars are one standard error (clustered by opening). Best-of-N
(N = 1, 2, 4, 8, 16; N = 1 is base) is one line, CBS one line per chunk length (base, W2K2, W4K4),
so a line that bends down as it moves right is over-optimization: more search, worse judge.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_report(report: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    guides = list(report["guides"])
    judges = list(report["judges"])
    fig, axes = plt.subplots(len(guides), len(judges), figsize=(5.2 * len(judges), 4.0 * len(guides)),
                             squeeze=False, sharex=True)
    for r, guide in enumerate(guides):
        methods = report["guides"][guide]["methods"]
        all_x = [m["upstream_tokens"] for m in methods.values()]
        lines: dict[str, list[str]] = {"best-of-N": [n for n, m in methods.items() if m["l"] is None]}
        for n, m in methods.items():
            if m["l"] is not None:
                lines.setdefault(f"CBS L={m['l']}", ["base"]).append(n)
        for c, judge in enumerate(judges):
            ax = axes[r][c]
            for i, (label, names) in enumerate(lines.items()):
                names = sorted(names, key=lambda n: methods[n]["upstream_tokens"])
                xs = [methods[n]["upstream_tokens"] for n in names]
                ys = [methods[n][judge]["mean"] for n in names]
                es = [methods[n][judge]["se"] for n in names]
                es = [0.0 if e != e else e for e in es]  # nan (one cluster) -> no bar
                marker = "o" if label == "best-of-N" else ("s", "^", "D", "v")[(i - 1) % 4]
                ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, linewidth=1.2, label=label)
                for n, x, y in zip(names, xs, ys):
                    if n != "base" or label == "best-of-N":
                        ax.annotate(n.replace("cbs-", ""), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xscale("log")
            ticks = [t for t in (25, 50, 100, 200, 500, 1000, 2000, 5000) if min(all_x) / 1.5 <= t <= max(all_x) * 1.5]
            ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"guide: {guide} / judge: {judge}", fontsize=10)
            ax.set_xlabel("upstream tokens per opening (prompt + completion)")
            ax.set_ylabel(f"{judge} (mean ± s.e.)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    s = report.get("settings", {})
    g0 = report["guides"][guides[0]] if guides else {}
    fig.suptitle(f"Gemma 3 270M guided by SmolLM2-135M pairs: {g0.get('openings', '?')} openings x "
                 f"{g0.get('seeds', '?')} seed(s), at most {s.get('max_new_tokens', '?')} new tokens", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dollars(report: Mapping[str, Any], path: Path) -> Path:
    """Judge score against dollars per 1,000 openings: a row per (system prompt, price list), a
    column per judge, for the first guide priced; best-of-N one line, CBS one line per chunk length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guide, g = next((n, g) for n, g in report["guides"].items() if "dollars" in g)
    judges = list(report["judges"])
    panels = [(block, name, pl) for block in g["dollars"].values() for name, pl in block["price_lists"].items()]
    fig, axes = plt.subplots(len(panels), len(judges), figsize=(5.2 * len(judges), 3.4 * len(panels)), squeeze=False)
    for r, (block, name, pl) in enumerate(panels):
        ms = pl["methods"]
        lines: dict[str, list[str]] = {"best-of-N": [n for n in ms if not n.startswith("cbs")]}
        for n in ms:
            if n.startswith("cbs"):
                lines.setdefault(f"CBS L={n.rsplit('l', 1)[1]}", ["base"]).append(n)
        for c, judge in enumerate(judges):
            ax = axes[r][c]
            for label, names in lines.items():
                names = sorted(names, key=lambda n: ms[n]["dollars"])
                xs = [ms[n]["dollars"] * 1000 for n in names]
                ax.errorbar(xs, [ms[n][judge]["mean"] for n in names], capsize=3, linewidth=1.2, label=label,
                            yerr=[0.0 if ms[n][judge]["se"] != ms[n][judge]["se"] else ms[n][judge]["se"] for n in names],
                            marker="o" if label == "best-of-N" else "s")
                for n, x in zip(names, xs):
                    if n != "base" or label == "best-of-N":
                        ax.annotate(n.replace("cbs-", ""), (x, ms[n][judge]["mean"]), textcoords="offset points",
                                    xytext=(4, 4), fontsize=7)
            ax.set_xscale("log")
            ax.set_title(f"{name}, system prompt {block['system_tokens']} tokens / {judge}", fontsize=9)
            ax.set_xlabel("$ per 1,000 openings")
            ax.set_ylabel(f"{judge} (mean ± s.e.)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Judge score per dollar, guide {guide} ({g['openings']} openings x {g['seeds']} seed(s))", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
