"""Does the tuned guide agree with judges on openings it never saw?

A guide is only useful to search if its score ranks candidates the way a judge would. After
training, continuations the untuned model writes for held-out openings (what a search would have
to choose between) are scored by the guide and by two lexicon judges: VADER, whose labels the
pairs came from, and TextBlob, which took no part, so agreement with it is not the guide merely
fitting its labeller. Correlations are across all continuations and within each opening (the
search only ever compares continuations of one prompt).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (as Spearman's rho needs)."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tied = x == v
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson's r; 0.0 when either side is constant (no ordering to agree with)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} vs {len(y)} values")
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    return pearson(ranks(a), ranks(b))


def within_group_spearman(groups: Sequence[tuple[Sequence[float], Sequence[float]]]) -> float:
    """Mean Spearman's rho inside each group (one opening's continuations), skipping constant ones."""
    rhos = [spearman(a, b) for a, b in groups
            if len(a) > 1 and np.ptp(np.asarray(a, float)) > 0 and np.ptp(np.asarray(b, float)) > 0]
    return float(np.mean(rhos)) if rhos else 0.0


def agreement(
    guide: Sequence[Sequence[float]], judged: dict[str, Sequence[Sequence[float]]]
) -> dict[str, dict[str, float]]:
    """Per judge: Pearson and Spearman over all continuations, and mean Spearman within openings."""
    flat_guide = [g for group in guide for g in group]
    out: dict[str, dict[str, float]] = {}
    for name, scores in judged.items():
        flat = [s for group in scores for s in group]
        out[name] = {
            "pearson": round(pearson(flat_guide, flat), 4),
            "spearman": round(spearman(flat_guide, flat), 4),
            "spearman_within_opening": round(within_group_spearman(list(zip(guide, scores))), 4),
        }
    return out


def heldout_check(
    peft_model: object,
    tokenizer: object,
    openings: Sequence[str],
    judges: dict[str, Callable[[str], float]],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
) -> dict[str, object]:
    """Sample with the adapter off (the parent), score with it on and off, correlate with `judges`."""
    from scorers.tuning.sampling import continuation_logprobs, sample_continuations

    with peft_model.disable_adapter():  # type: ignore[attr-defined]
        samples = sample_continuations(peft_model, tokenizer, openings, k=k, max_new_tokens=max_new_tokens,  # type: ignore[arg-type]
                                       temperature=temperature, top_p=1.0, seed=seed, batch_size=batch_size)
    guide: list[list[float]] = []
    judged: dict[str, list[list[float]]] = {name: [] for name in judges}
    for opening, texts in zip(openings, samples):
        texts = [t for t in texts if t.strip()]
        if not texts:
            continue
        tuned = continuation_logprobs(peft_model, tokenizer, opening, texts)  # type: ignore[arg-type]
        with peft_model.disable_adapter():  # type: ignore[attr-defined]
            untuned = continuation_logprobs(peft_model, tokenizer, opening, texts)  # type: ignore[arg-type]
        guide.append([t - u for t, u in zip(tuned, untuned)])
        for name, judge in judges.items():
            judged[name].append([judge(t) for t in texts])
    n = sum(len(g) for g in guide)
    return {"openings": len(guide), "continuations": n, "samples_per_opening": k,
            "correlation": agreement(guide, judged)}
