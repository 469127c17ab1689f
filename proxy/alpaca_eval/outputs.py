"""What a run writes: model_outputs.json (the rows alpaca_eval reads) and summary.json (the
run's summary), their models, and the atomic write both go through. Shared by the runner and
the shard merge.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from proxy.alpaca_eval.checkpoint import ItemRecord
from proxy.alpaca_eval.dataset import Selection
from proxy.config import ConfigError

OUTPUTS_NAME = "model_outputs.json"


def outputs_name(shard: object | None) -> str:
    """model_outputs.json for a whole run; a shard's part is named for what it is
    (`model_outputs.shard-2-of-4.json`), so a part is never submitted for the whole by mistake.
    `w2s alpaca-eval merge` joins the parts into model_outputs.json."""
    if shard is None:
        return OUTPUTS_NAME
    index, count = str(shard).split("/")
    return f"model_outputs.shard-{index}-of-{count}.json"


def partial_name(shard: object | None) -> str:
    """The answered items of a run whose other items failed permanently
    (`model_outputs.partial.json`): named for what it is, never judged as the whole by mistake."""
    return outputs_name(shard).removesuffix(".json") + ".partial.json"
SUMMARY_NAME = "summary.json"
ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
"""AlpacaEval 2.0's judge (length-controlled win rate against gpt-4-turbo)."""


class OutputRow(BaseModel):
    """One row of model_outputs.json, exactly the four columns alpaca_eval reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction: str
    output: str
    generator: str
    dataset: str


class SelectionInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    total: int
    """Items after --limit: the space the shards tile."""
    start: int
    stop: int
    shard: str | None
    digest: str
    """sha256 of the selected instruction strings, in order."""

    @classmethod
    def of(cls, s: Selection) -> "SelectionInfo":
        return cls(source=s.source, total=s.total, start=s.start, stop=s.stop,
                   shard=None if s.shard is None else str(s.shard), digest=s.digest)


class ItemStats(BaseModel):
    """Totals and means over answered items (any run that produced them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    answered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of prompt_tokens, those read from the upstream's prompt cache; cache_write_tokens: written to it."""
    cache_write_tokens: int = 0
    upstream_calls: int = 0
    cost_usd: float = 0.0
    mean_steps: float | None = None
    mean_score: float | None = None
    scored: int = 0
    """Items with a score (all of them when a scorer is configured, none otherwise)."""
    mean_output_tokens: float | None = None
    empty_outputs: int = 0

    @classmethod
    def of(cls, records: Sequence[ItemRecord]) -> "ItemStats":
        scores = [r.score for r in records if r.score is not None]
        return cls(
            answered=len(records),
            prompt_tokens=sum(r.prompt_tokens for r in records),
            completion_tokens=sum(r.completion_tokens for r in records),
            cached_tokens=sum(r.cached_tokens for r in records),
            cache_write_tokens=sum(r.cache_write_tokens for r in records),
            upstream_calls=sum(r.calls for r in records),
            cost_usd=sum(r.cost_usd for r in records),
            mean_steps=statistics.fmean(r.steps for r in records) if records else None,
            mean_score=statistics.fmean(scores) if scores else None,
            scored=len(scores),
            mean_output_tokens=statistics.fmean(r.tokens for r in records) if records else None,
            empty_outputs=sum(1 for r in records if r.output == ""),
        )


class ThisRun(BaseModel):
    """What this invocation did; `billed_*` is what the upstream billed meanwhile, failed
    attempts included (the engine's running usage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempted: int
    answered: int
    failed: int
    billed_prompt_tokens: int
    billed_completion_tokens: int
    billed_cost_usd: float
    wall_s: float
    concurrency: int
    billed_cached_tokens: int = 0
    billed_cache_write_tokens: int = 0


class Failure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    error: str | None
    permanent: bool = False
    """Running the same command again cannot mend it (proxy.alpaca_eval.policy)."""


class RunSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    generator: str
    fingerprint: str
    complete: bool
    items: int
    done: int
    failed: int
    resumed: int
    """Items answered by earlier runs of this directory."""
    selection: SelectionInfo
    stats: ItemStats
    this_run: ThisRun
    failures: list[Failure]
    model_outputs: str | None
    alpaca_eval_command: str | None
    on_too_long: str = "fail"
    """The --on-too-long policy of this run."""
    permanent_failures: int = 0
    fallbacks: dict[str, list[int]] = {}
    """Items answered by an --on-too-long fallback ("unguided", "truncate-left"): their indexes."""
    partial_outputs: str | None = None
    """When every failure is permanent: the answered items' rows (not comparable to a full run)."""


def alpaca_eval_command(outputs: Path, reference: Path | None = None) -> str:
    """The judge's command line: AlpacaEval 2.0's annotator, and `--reference_outputs` (the
    gpt-4-turbo answers the outputs are compared with) where a local file holds them
    (proxy.alpaca_eval.dataset.reference_outputs_file); without it alpaca_eval fetches that
    file from the Hugging Face hub itself."""
    command = f"alpaca_eval --model_outputs {shlex.quote(str(outputs.resolve()))} --annotators_config {ANNOTATOR}"
    if reference is not None:
        command += f" --reference_outputs {shlex.quote(str(reference))}"
    return command


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    """Readers see the old file or the whole new one, never half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it (mkstemp makes 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_outputs(path: str | Path) -> list[OutputRow]:
    """model_outputs.json, validated row by row."""
    p = Path(path)
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: not found") from None
    except ValueError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise ConfigError(f"{p}: expected a JSON list")
    try:
        return [OutputRow.model_validate(r) for r in rows]
    except ValueError as e:
        raise ConfigError(f"{p}: {e}") from None
