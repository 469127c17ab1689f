"""The generation loop: every selected instruction not yet answered, through the guided client,
each result appended to the checkpoint the moment it arrives.

`model_outputs.json` is derived data: it is rebuilt from the checkpoint, in dataset order, only
when every selected item has an answer, and written atomically (temporary file + rename), so a
file that exists is always complete. `summary.json` is written at the end of every run that
was not killed, complete or not.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict

from proxy.alpaca_eval.checkpoint import Checkpoint, CheckpointState, ItemRecord, check_header, read_checkpoint
from proxy.alpaca_eval.dataset import Instruction, Selection
from proxy.alpaca_eval.identity import config_fingerprint, generator_name
from proxy.alpaca_eval.progress import ProgressBar
from proxy.client import Generated, GuidedClient
from proxy.config import AppConfig, ConfigError, Prices
from proxy.cost import cost_usd
from proxy.upstreams.base import Usage

log = logging.getLogger("w2s.alpaca_eval")

OUTPUTS_NAME = "model_outputs.json"
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
            upstream_calls=sum(r.calls for r in records),
            cost_usd=sum(r.cost_usd for r in records),
            mean_steps=statistics.fmean(r.steps for r in records) if records else None,
            mean_score=statistics.fmean(scores) if scores else None,
            scored=len(scores),
            mean_output_tokens=statistics.fmean(r.tokens for r in records) if records else None,
            empty_outputs=sum(1 for r in records if r.output == ""),
        )


class ThisRun(BaseModel):
    """What this invocation did; `billed_*` include failed attempts when the upstream reports
    its running usage (the OpenAI upstream does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempted: int
    answered: int
    failed: int
    billed_prompt_tokens: int
    billed_completion_tokens: int
    billed_cost_usd: float
    wall_s: float
    concurrency: int


class Failure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    error: str | None


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


def alpaca_eval_command(outputs: Path) -> str:
    return f"alpaca_eval --model_outputs {shlex.quote(str(outputs.resolve()))} --annotators_config {ANNOTATOR}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Readers see the old file or the whole new one, never half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def item_record(index: int, item: Instruction, g: Generated, prices: Prices) -> ItemRecord:
    """A failure keeps its error and no output: it is retried, never written as an empty answer."""
    if g.result is None:
        err = g.error
        return ItemRecord(index=index, instruction=item.instruction, dataset=item.dataset, status="failed",
                          error=f"{type(err).__name__}: {err}" if err is not None else "no result")
    r = g.result
    return ItemRecord(
        index=index, instruction=item.instruction, dataset=item.dataset, status="ok", output=r.text,
        score=r.score, finished=r.finished, steps=len(r.steps), calls=r.calls, tokens=r.tokens,
        prompt_tokens=r.usage.prompt_tokens, completion_tokens=r.usage.completion_tokens,
        cost_usd=cost_usd(r.usage, prices), wall_s=r.wall_s,
    )


def _billed(client: GuidedClient) -> Usage | None:
    usage = getattr(client.upstream, "usage", None)
    return usage if isinstance(usage, Usage) else None


def _spent_since(client: GuidedClient, before: Usage | None, answered: Usage) -> Usage:
    """What the upstream billed since `before` (failed attempts included), when it keeps a
    running total; else the usage of the items answered (all that is known)."""
    now = _billed(client)
    if before is None or now is None:
        return answered
    return Usage(now.prompt_tokens - before.prompt_tokens, now.completion_tokens - before.completion_tokens)


def check_against_dataset(state: CheckpointState, selection: Selection, directory: Path) -> None:
    """An index answered for a different instruction means the input changed under the run."""
    for offset, item in enumerate(selection.items):
        rec = state.done.get(selection.start + offset)
        if rec is not None and rec.instruction != item.instruction:
            raise ConfigError(
                f"{directory}: item {rec.index} was answered for another instruction "
                f"({rec.instruction[:60]!r} vs {item.instruction[:60]!r}): the instructions file changed. "
                "Use another --output directory.")


def preflight(output_dir: str | Path, cfg: AppConfig, selection: Selection, generator: str) -> int:
    """Check that `output_dir` can be resumed with this config and these instructions before
    loading any model (a 7B scorer takes minutes); returns how many items are already done.
    `run_alpaca_eval` repeats the checks under the lock."""
    out = Path(output_dir)
    state = read_checkpoint(out)
    if state.header is not None:
        check_header(state.header, out, fingerprint=config_fingerprint(cfg), generator=generator)
    check_against_dataset(state, selection, out)
    return sum(1 for i in selection.indices if i in state.done)


@dataclass
class _Tally:
    """What this invocation did, for the summary."""

    attempted: int = 0
    answered: int = 0
    failed: int = 0
    answered_usage: Usage = Usage()


async def _answer_pending(client: GuidedClient, ckpt: Checkpoint, pending: list[tuple[int, Instruction]],
                          concurrency: int, bar: ProgressBar | None, spent_before_usd: float,
                          billed_before: Usage | None) -> _Tally:
    """Run the searches; every result goes to the checkpoint the moment it arrives."""
    tally = _Tally(attempted=len(pending))
    prices = client.config.upstream.prices
    gen = client.generate_many([it.instruction for _, it in pending], concurrency=concurrency)
    async with contextlib.aclosing(gen):
        async for g in gen:
            index, item = pending[g.index]
            rec = item_record(index, item, g, prices)
            ckpt.append(rec)
            if rec.status == "ok":
                tally.answered += 1
                tally.answered_usage += Usage(rec.prompt_tokens, rec.completion_tokens)
            else:
                tally.failed += 1
                log.warning("item %d failed: %s", index, rec.error)
            if bar is not None:
                spent = _spent_since(client, billed_before, tally.answered_usage)
                bar.update(ok=rec.status == "ok", spent_usd=spent_before_usd + cost_usd(spent, prices))
    return tally


def _write_results(state: CheckpointState, selection: Selection, out: Path, name: str) -> tuple[
        list[ItemRecord], list[Failure], Path | None]:
    """model_outputs.json when every item has an answer; otherwise no such file at all."""
    done = [state.done[i] for i in selection.indices if i in state.done]
    failures = [Failure(index=i, error=state.failed[i].error if i in state.failed else None)
                for i in selection.indices if i not in state.done]
    path = out / OUTPUTS_NAME
    if not failures:
        rows = [OutputRow(instruction=item.instruction, output=rec.output, generator=name, dataset=item.dataset)
                for item, rec in zip(selection.items, done)]
        write_json_atomic(path, [r.model_dump() for r in rows])
        return done, failures, path
    if path.exists():
        path.unlink()  # derived data: a stale file could be judged as if it were this run's
        log.info("removed %s: this run is incomplete", path)
    return done, failures, None


async def run_alpaca_eval(
    client: GuidedClient,
    selection: Selection,
    output_dir: str | Path,
    *,
    concurrency: int = 8,
    generator: str | None = None,
    progress: bool | TextIO = True,
) -> RunSummary:
    """Answer every item of `selection` not answered yet in `output_dir`; `client` must be open.

    Returns the summary (also written to summary.json); `complete` is False when some item
    failed, and running again retries exactly those. `progress`: a bar on stderr (True), on
    the given stream, or none (False).
    """
    if concurrency < 1:
        raise ConfigError("--concurrency: must be at least 1")
    out = Path(output_dir)
    cfg = client.config
    scorer_label = getattr(client.scorer, "name", None) if cfg.scorer is None else None
    name = generator or generator_name(cfg, scorer_label=scorer_label)
    fingerprint = config_fingerprint(cfg)
    t0 = time.perf_counter()
    with Checkpoint.open(out, fingerprint=fingerprint, generator=name) as ckpt:
        check_against_dataset(ckpt.state, selection, out)
        pending = [(i, it) for i, it in zip(selection.indices, selection.items) if i not in ckpt.state.done]
        resumed = len(selection) - len(pending)
        resumed_cost = sum(ckpt.state.done[i].cost_usd for i in selection.indices if i in ckpt.state.done)
        bar = None
        if progress is not False:
            bar = ProgressBar(len(selection), done=resumed, cost_usd=resumed_cost,
                              stream=None if progress is True else progress)
            bar.draw(force=True)
        billed_before = _billed(client)
        try:
            tally = await _answer_pending(client, ckpt, pending, concurrency, bar, resumed_cost, billed_before)
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
        done, failures, outputs = _write_results(ckpt.state, selection, out, name)
        billed = _spent_since(client, billed_before, tally.answered_usage)
        summary = RunSummary(
            generator=name, fingerprint=fingerprint, complete=not failures, items=len(selection), done=len(done),
            failed=len(failures), resumed=resumed, selection=SelectionInfo.of(selection), stats=ItemStats.of(done),
            this_run=ThisRun(attempted=tally.attempted, answered=tally.answered, failed=tally.failed,
                             billed_prompt_tokens=billed.prompt_tokens,
                             billed_completion_tokens=billed.completion_tokens,
                             billed_cost_usd=cost_usd(billed, cfg.upstream.prices), wall_s=round(wall, 3),
                             concurrency=concurrency),
            failures=failures,
            model_outputs=None if outputs is None else str(outputs.resolve()),
            alpaca_eval_command=None if outputs is None else alpaca_eval_command(outputs),
        )
        write_json_atomic(out / SUMMARY_NAME, summary.model_dump())
    return summary


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
