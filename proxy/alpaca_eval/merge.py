"""Joining shard outputs into one model_outputs.json, with proof that nothing is missing or doubled.

Each shard directory holds its model_outputs.json and the summary.json of the run that wrote
it; the summary says which dataset range [start, stop) of how many items the shard answers
and a digest of those instruction strings. The merge checks that:
  - every shard run is complete and names the same generator, configuration and dataset size;
  - each shard's rows are exactly its range (row count and instruction digest);
  - the ranges, sorted, tile [0, total) with no gap (missing) and no overlap (doubled);
  - with the instructions at hand, that the merged list equals the dataset's, in order.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.alpaca_eval.dataset import Instruction, instructions_digest, reference_outputs_file
from proxy.alpaca_eval.outputs import (
    OUTPUTS_NAME,
    SUMMARY_NAME,
    ItemStats,
    OutputRow,
    RunSummary,
    alpaca_eval_command,
    outputs_name,
    read_outputs,
    write_json_atomic,
)
from proxy.config import ConfigError, format_validation_error


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str
    shard: str | None
    start: int
    stop: int
    wall_s: float
    """Wall time of the run that completed the shard."""


class MergeSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    generator: str
    fingerprint: str
    items: int
    shards: list[ShardInfo]
    stats: ItemStats
    model_outputs: str
    alpaca_eval_command: str


def combine_stats(parts: Sequence[ItemStats]) -> ItemStats:
    """Sums, and means weighted by the counts they were taken over."""

    def weighted(pairs: list[tuple[float | None, int]]) -> float | None:
        pairs = [(m, n) for m, n in pairs if m is not None and n > 0]
        total = sum(n for _, n in pairs)
        return sum(m * n for m, n in pairs) / total if total else None  # type: ignore[operator]

    return ItemStats(
        answered=sum(p.answered for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        completion_tokens=sum(p.completion_tokens for p in parts),
        cached_tokens=sum(p.cached_tokens for p in parts),
        cache_write_tokens=sum(p.cache_write_tokens for p in parts),
        upstream_calls=sum(p.upstream_calls for p in parts),
        cost_usd=sum(p.cost_usd for p in parts),
        mean_steps=weighted([(p.mean_steps, p.answered) for p in parts]),
        mean_score=weighted([(p.mean_score, p.scored) for p in parts]),
        scored=sum(p.scored for p in parts),
        mean_output_tokens=weighted([(p.mean_output_tokens, p.answered) for p in parts]),
        empty_outputs=sum(p.empty_outputs for p in parts),
    )


def _load_shard(directory: Path) -> tuple[RunSummary, list[OutputRow]]:
    path = directory / SUMMARY_NAME
    try:
        summary = RunSummary.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{directory}: no {SUMMARY_NAME}; is this an `w2s alpaca-eval` output directory?") from None
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e)}") from None
    if not summary.complete:
        raise ConfigError(f"{directory}: shard {summary.selection.shard or ''} is incomplete "
                          f"({summary.failed} of {summary.items} items missing); run its command again first")
    sel = summary.selection
    part = outputs_name(sel.shard)
    rows = read_outputs(directory / part)
    if len(rows) != sel.stop - sel.start:
        raise ConfigError(f"{directory}: {part} has {len(rows)} rows, its run answered "
                          f"{sel.stop - sel.start} (items {sel.start}..{sel.stop - 1})")
    if instructions_digest([r.instruction for r in rows]) != sel.digest:
        raise ConfigError(f"{directory}: the instructions in {part} are not the ones its run answered "
                          "(edited, reordered or from another run)")
    if any(r.generator != summary.generator for r in rows):
        raise ConfigError(f"{directory}: rows name a generator other than {summary.generator!r}")
    return summary, rows


def merge_shards(shard_dirs: Sequence[str | Path], output_dir: str | Path, *,
                 instructions: Sequence[Instruction] | None = None) -> MergeSummary:
    """Check and join shard directories into `output_dir`/model_outputs.json (+ summary.json)."""
    if not shard_dirs:
        raise ConfigError("merge: name at least one shard directory")
    out = Path(output_dir)
    dirs = [Path(d) for d in shard_dirs]
    if any(d.resolve() == out.resolve() for d in dirs):
        raise ConfigError(f"merge: --output {out} is one of the shard directories; pick a new directory")
    loaded = [(d, *_load_shard(d)) for d in dirs]

    first = loaded[0][1]
    for d, s, _ in loaded[1:]:
        for field in ("generator", "fingerprint"):
            if getattr(s, field) != getattr(first, field):
                raise ConfigError(f"merge: {d} has {field} {getattr(s, field)!r}, {loaded[0][0]} has "
                                  f"{getattr(first, field)!r}: shards of different runs")
        if s.selection.total != first.selection.total:
            raise ConfigError(f"merge: {d} shards {s.selection.total} items, {loaded[0][0]} shards "
                              f"{first.selection.total} (different --limit or dataset)")

    total = first.selection.total
    ordered = sorted(loaded, key=lambda t: (t[1].selection.start, t[1].selection.stop))
    expected = 0
    for i, (d, s, _) in enumerate(ordered):
        sel = s.selection
        if sel.start > expected:
            raise ConfigError(f"merge: items {expected}..{sel.start - 1} are missing (no shard covers them)")
        if sel.start < expected:
            prev = ordered[i - 1][0]
            raise ConfigError(f"merge: items {sel.start}..{min(expected, sel.stop) - 1} are doubled "
                              f"({prev} and {d} both hold them)")
        expected = sel.stop
    if expected < total:
        raise ConfigError(f"merge: items {expected}..{total - 1} are missing (no shard covers them)")

    rows = [r for _, _, shard_rows in ordered for r in shard_rows]
    if instructions is not None:
        want = [it.instruction for it in instructions[:total]]
        got = [r.instruction for r in rows]
        if got != want:
            at = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ConfigError(f"merge: merged instructions differ from the dataset at item {at}")

    out.mkdir(parents=True, exist_ok=True)
    outputs = out / OUTPUTS_NAME
    write_json_atomic(outputs, [r.model_dump() for r in rows])
    summary = MergeSummary(
        generator=first.generator, fingerprint=first.fingerprint, items=len(rows),
        shards=[ShardInfo(directory=str(d.resolve()), shard=s.selection.shard, start=s.selection.start,
                          stop=s.selection.stop, wall_s=s.this_run.wall_s) for d, s, _ in ordered],
        stats=combine_stats([s.stats for _, s, _ in ordered]),
        model_outputs=str(outputs.resolve()),
        alpaca_eval_command=alpaca_eval_command(outputs, reference_outputs_file(first.selection.source)),
    )
    write_json_atomic(out / SUMMARY_NAME, summary.model_dump())
    return summary

