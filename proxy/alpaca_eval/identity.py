"""What a run is: the generator name alpaca_eval shows, and a fingerprint of the settings
that shape the answers.

The name is one value per file (alpaca_eval's leaderboard row), so it spells out the strong
model, the guidance pair and W/K/L, e.g.
`gpt-3.5-turbo-instruct_zephyr-7b-beta-vs-mistral-7b-sft-beta_cbs-w2k2l30`. Plain sampling is
`unguided` even when a scorer is configured: with one candidate per step the pair only reports
scores, it steers nothing.

The fingerprint covers what changes the answers (model, prompt rendering, scoring models,
search settings) and leaves out what does not (base_url, keys, limits, prices, device), so a
resumed run may move to another endpoint but may not mix answers of two configurations.
"""
from __future__ import annotations

import hashlib
import json
import re

from proxy.config import AppConfig, ModelSpec, SearchConfig, answer_shaping
from proxy.config.search import search_identity
from proxy.search import mode_name, needs_scorer


def _last_component(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1] or path


def model_label(spec: ModelSpec) -> str:
    """The last path component of a hub id or directory (`HuggingFaceH4/zephyr-7b-beta` ->
    `zephyr-7b-beta`), or the GGUF file's stem; `+adapter` when an adapter is merged in, since
    the same base with and without it are different guides."""
    if spec.gguf_file:
        label = re.sub(r"\.gguf$", "", spec.gguf_file.rsplit("/", 1)[-1], flags=re.IGNORECASE)
    else:
        label = _last_component(spec.path)
    return f"{label}+{_last_component(spec.adapter)}" if spec.adapter else label


def wkl(search: SearchConfig) -> str:
    return f"w{search.w}k{search.k}l{search.l if search.l is not None else 'inf'}"


def generator_name(cfg: AppConfig, *, scorer_label: str | None = None, on_too_long: str = "fail") -> str:
    """`scorer_label` names a scorer given to the client directly rather than by the config.
    An --on-too-long policy other than `fail` answers the instructions too long for the guide
    another way, so it is named: `..._cbs-w4k4l30_too-long-unguided`. It is not in the
    fingerprint: the items that fit are answered alike under every policy, so a directory run
    with `fail` can be finished with another policy without paying for its answers again (each
    record says which fallback answered it)."""
    search = cfg.search
    if not needs_scorer(search):
        guidance = "unguided"
    elif cfg.scorer is not None:
        tuned = model_label(cfg.scorer.tuned)
        if cfg.scorer.expo_alpha is not None:  # ExPO extrapolates the tuned model: another guide
            tuned += f"-expo{cfg.scorer.expo_alpha:g}"
        guidance = f"{tuned}-vs-{model_label(cfg.scorer.untuned)}"
    else:
        guidance = scorer_label or "scorer"
    mode = mode_name(search)
    mode = mode if mode.startswith("cbs-") else f"{mode}-{wkl(search)}"
    suffix = "" if on_too_long == "fail" else f"_too-long-{on_too_long}"
    return f"{cfg.upstream.model.rsplit('/', 1)[-1]}_{guidance}_{mode}{suffix}"


def _scoring_model(spec: ModelSpec) -> dict:
    """A scoring model as it shapes answers: its files and rules, and for a remote one the name
    its engine serves (which weights), not where the engine is."""
    shaping = spec.model_dump(exclude={"engine"})
    if spec.engine is not None:
        shaping["engine_model"] = spec.engine.model or spec.path
    return shaping


def _search_identity(search: SearchConfig) -> dict:
    """The settings that shape answers, each by its rule in the settings table (caps only where
    set, so fingerprints made before they existed still hold). The start is the one setting
    written its own way: runs made before it was an option drew K first chunks, which is
    `narrow_start` now, so those keep their fingerprint and the paper's W·K start is marked
    where it differs (W > 1)."""
    identity = search_identity(search)
    narrow = identity.pop("narrow_start", False)
    if search.w > 1 and not narrow:
        identity["first_step"] = "w*k"
    return identity


def config_fingerprint(cfg: AppConfig) -> str:
    shaping = {
        # What the upstream's family marks as shaping answers (proxy.config.upstream), as the
        # response cache keys on it; fields that began to count later only where set, so the
        # fingerprints of earlier runs (and their checkpoints) stay what they were.
        "upstream": answer_shaping(cfg.upstream),
        "scorer": None if cfg.scorer is None else {
            "kind": cfg.scorer.kind, "tuned": _scoring_model(cfg.scorer.tuned),
            "untuned": _scoring_model(cfg.scorer.untuned),
            "expo_alpha": cfg.scorer.expo_alpha},
        "search": _search_identity(cfg.search),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
