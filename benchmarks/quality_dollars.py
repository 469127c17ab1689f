"""The quality benchmark in the unit users pay in: each method's judge scores against dollars per
opening under named price lists (benchmarks/billing.py), which method is best at each budget,
and each CBS setting against the cheapest best-of-N that costs at least as much.

Dollars are computed from the exact requests each method made (best-of-N: one request of N
samples; CBS: its recorded search tree) under each provider's documented cache rule. A second
block prices the same requests behind a long shared system prompt (`system_tokens`, e.g. a
product's instructions), which is where providers' caches start to matter: the benchmark's own
prompts (~20 tokens) are below every cache's reach but DeepSeek's.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from benchmarks.billing import PRICE_LISTS, Bill, Request, Tokenize, bill
from proxy.film_reviews.stats import estimate, paired

Key = tuple[int, int]


def filler(tokens: int, tokenize: Tokenize) -> str:
    """A system prompt of about `tokens` tokens (plain numbered sentences)."""
    if tokens <= 0:
        return ""
    text, i = "", 0
    while len(tokenize(text)) < tokens:
        text += "".join(f"Rule {i + j}: answer in plain words. " for j in range(64))
        i += 64
    while len(tokenize(text)) > tokens:  # trim to the budget a sentence at a time, then a word
        cut = text.rstrip().rsplit(" ", 1)[0] + " "
        text = cut if cut != text else text[:-1]
    return text


def cached_tokenizer(tokenize: Tokenize) -> Tokenize:
    return lru_cache(maxsize=200_000)(lambda t: tuple(tokenize(t)))


def dollars_section(requests: Mapping[str, Mapping[Key, list[Request]]], judged: Mapping[str, Mapping[Key, Mapping[str, float]]],
                    common: set[Key], instructions: Sequence[str], tokenize: Tokenize, judges: Sequence[str],
                    system_tokens: Sequence[int] = (0,)) -> dict[str, Any]:
    """Per system-prompt length and price list: each method's mean dollars per opening, cached
    share and judges; the methods best at each budget; CBS against best-of-N at >= dollars."""
    tok = cached_tokenizer(tokenize)
    out: dict[str, Any] = {}
    keys = sorted(k for k in common if all(k in r for r in requests.values()))
    for sys_tokens in system_tokens:
        system = filler(sys_tokens, tok)
        block: dict[str, Any] = {"system_tokens": len(tok(system)), "price_lists": {}}
        for name, plist in PRICE_LISTS.items():
            prices = plist.prices
            bills: dict[str, dict[Key, Bill]] = {
                m: {k: bill(instructions[k[0]], reqs[k], plist, tok, system) for k in keys}
                for m, reqs in requests.items()}
            methods: dict[str, Any] = {}
            for m, per_key in bills.items():
                cost = {k: b.dollars(prices) for k, b in per_key.items()}
                prompt = sum(b.prompt_total for b in per_key.values())
                methods[m] = {
                    "dollars": estimate(cost).mean, "cost_by_key": cost,
                    "cached_share": sum(b.cached for b in per_key.values()) / prompt if prompt else 0.0,
                    "requests": sum(b.requests for b in per_key.values()) / max(len(per_key), 1),
                    **{j: _est(estimate({k: judged[m][k][j] for k in keys})) for j in judges}}
            block["price_lists"][name] = {
                "preset": plist.preset, "rule": plist.rule_source, "prices": prices.model_dump(),
                "methods": {m: {k: v for k, v in e.items() if k != "cost_by_key"} for m, e in methods.items()},
                "frontier": {j: frontier(methods, j) for j in judges},
                "cbs_vs_bon": cbs_vs_dearer_bon(methods, judged, keys, judges)}
        out[str(sys_tokens)] = block
    return out


def _est(e: Any) -> dict[str, float]:
    return {"mean": e.mean, "se": e.se}


def frontier(methods: Mapping[str, Mapping[str, Any]], judge: str) -> list[str]:
    """The methods best at their budget: cheapest first, each better on `judge` than every cheaper one."""
    best, out = -math.inf, []
    for m in sorted(methods, key=lambda m: (methods[m]["dollars"], -methods[m][judge]["mean"])):
        if methods[m][judge]["mean"] > best:
            best = methods[m][judge]["mean"]
            out.append(m)
    return out


def cbs_vs_dearer_bon(methods: Mapping[str, Mapping[str, Any]], judged: Mapping[str, Mapping[Key, Mapping[str, float]]],
                      keys: Sequence[Key], judges: Sequence[str]) -> dict[str, Any]:
    """Each CBS setting minus the cheapest best-of-N costing at least as much (paired by opening
    and seed): above it by two standard errors is a search worth its price there."""
    bons = sorted((m for m in methods if not m.startswith("cbs")), key=lambda m: methods[m]["dollars"])
    out: dict[str, Any] = {}
    for m in (m for m in methods if m.startswith("cbs")):
        dearer = [b for b in bons if methods[b]["dollars"] >= methods[m]["dollars"]]
        if not dearer:
            out[m] = {"bon": None}
            continue
        b = dearer[0]
        out[m] = {"bon": b, "dollars": [methods[m]["dollars"], methods[b]["dollars"]]} | {
            j: _est(paired({k: judged[m][k][j] for k in keys}, {k: judged[b][k][j] for k in keys})) for j in judges}
    return out


def _money(x: float) -> str:
    return f"${x * 1000:.4f}"


def format_dollars(section: Mapping[str, Any], judges: Sequence[str], guide: str) -> str:
    out: list[str] = []
    for block in section.values():
        for name, pl in block["price_lists"].items():
            p = pl["prices"]
            out.append(f"\n### guide {guide}, price list: {name} (preset {pl['preset']}: ${p['prompt']} in, "
                       f"${p['completion']} out, cached {p['cached_prompt']}, write {p['cache_write']} per M; "
                       f"system prompt {block['system_tokens']} tokens)\n\ncache rule: {pl['rule']}\n")
            out.append("| method | $ per 1,000 openings | requests/opening | prompt cached | "
                       + " | ".join(judges) + " |")
            out.append("|---|---:|---:|---:|" + "---:|" * len(judges))
            ms = pl["methods"]
            for m in sorted(ms, key=lambda m: ms[m]["dollars"]):
                e = ms[m]
                out.append(f"| {m} | {_money(e['dollars'])} | {e['requests']:.1f} | {e['cached_share']:.0%} | "
                           + " | ".join(f"{e[j]['mean']:+.3f} ± {e[j]['se']:.3f}" for j in judges) + " |")
            for j in judges:
                out.append(f"\nbest at each budget by {j}: " + " < ".join(
                    f"{m} ({_money(ms[m]['dollars'])})" for m in pl["frontier"][j]))
            out.append("\n| CBS vs the cheapest best-of-N costing as much | $ per 1,000 (CBS vs BoN) | "
                       + " | ".join(f"{j} (z)" for j in judges) + " |")
            out.append("|---|---:|" + "---:|" * len(judges))
            for m, c in pl["cbs_vs_bon"].items():
                if c["bon"] is None:
                    out.append(f"| {m} | no best-of-N costs as much | " + " | ".join("" for _ in judges) + " |")
                    continue
                out.append(f"| {m} - {c['bon']} | {_money(c['dollars'][0])} vs {_money(c['dollars'][1])} | "
                           + " | ".join(f"{c[j]['mean']:+.3f} ± {c[j]['se']:.3f} ({z_text(c[j])})" for j in judges) + " |")
    return "\n".join(out)


def z_text(e: Mapping[str, float]) -> str:
    """An estimate's z (mean / s.e.) as the tables print it; "n/a" without a standard error."""
    return f"{e['mean'] / e['se']:+.1f}" if e["se"] and not math.isnan(e["se"]) else "n/a"


def gemma_tokenizer() -> Callable[[str], Sequence[int]]:
    """The black box's tokenizer (Gemma 3 270M, from the GGUF the benchmark serves)."""
    from transformers import AutoTokenizer

    from proxy.film_reviews.models import fetch_gemma3_270m

    spec = fetch_gemma3_270m()
    tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]
