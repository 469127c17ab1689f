"""The generation loop: every selected instruction not yet answered, through the guided client,
each result appended to the checkpoint the moment it arrives.

`model_outputs.json` is derived data: it is rebuilt from the checkpoint, in dataset order, only
when every selected item has an answer, and written atomically (temporary file + rename), so a
file that exists is always complete. When every item left is a permanent failure (running again
cannot mend it, proxy.alpaca_eval.policy), the answered items go to `model_outputs.partial.json`
instead. `summary.json` is written at the end of every run that was not killed, complete or not.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from proxy.alpaca_eval.checkpoint import Checkpoint, CheckpointState, ItemRecord, check_header, read_checkpoint
from proxy.alpaca_eval.dataset import Instruction, Selection, reference_outputs_file
from proxy.alpaca_eval.identity import config_fingerprint, generator_name
from proxy.alpaca_eval.outputs import (
    SUMMARY_NAME,
    Failure,
    ItemStats,
    OutputRow,
    RunSummary,
    SelectionInfo,
    ThisRun,
    alpaca_eval_command,
    outputs_name,
    partial_name,
    write_json_atomic,
)
from proxy.alpaca_eval.policy import ON_TOO_LONG, OnTooLong, answer_too_long, describe, is_permanent, is_too_long
from proxy.alpaca_eval.progress import ProgressBar
from proxy.budget import Budget, BudgetExhausted
from proxy.client import Generated, GuidedClient
from proxy.config import AppConfig, ConfigError
from proxy.cost import cost_usd
from proxy.types import Usage

log = logging.getLogger("w2s.alpaca_eval")


def item_record(index: int, item: Instruction, g: Generated, client: GuidedClient, policy: OnTooLong = "fail",
                fallback: str | None = None, cut_chars: int = 0) -> ItemRecord:
    """A failure keeps its error and no output: it is retried, never written as an empty answer.
    An answer the run's budget cut short is a failure too (the next run, with money, redoes it);
    one cut by its own per-search cap is an answer, as configured, unless it was cut before its
    first step ended (a deadline shorter than a step): then there is no answer to write.
    `fallback` (and `cut_chars`): the --on-too-long fallback that answered it, if one did."""
    if g.result is not None and g.result.stopped_by == "shared budget":
        g = Generated(g.index, g.prompt, error=BudgetExhausted("the run's budget ran out during this item"))
    elif g.result is not None and not g.result.steps and g.result.stopped_by is not None:
        g = Generated(g.index, g.prompt, error=TimeoutError(f"cut by {g.result.stopped_by} before its first step "
                                                            "ended: nothing was answered"))
    if g.result is None:
        err = g.error
        return ItemRecord(index=index, instruction=item.instruction, dataset=item.dataset, status="failed",
                          error=describe(err, policy), permanent=is_permanent(err))
    s = client.summarize(g.result)
    return ItemRecord(
        index=index, instruction=item.instruction, dataset=item.dataset, status="ok", output=g.result.text,
        score=s.score, finished=s.finished, steps=s.steps, calls=s.upstream_calls, tokens=s.tokens,
        prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens, cost_usd=s.cost_usd, wall_s=s.wall_s,
        cached_tokens=s.cached_tokens, cache_write_tokens=s.cache_write_tokens,
        fallback=fallback, cut_chars=cut_chars,  # type: ignore[arg-type]
    )


def check_against_dataset(state: CheckpointState, selection: Selection, directory: Path) -> None:
    """An index answered for a different instruction means the input changed under the run."""
    for offset, item in enumerate(selection.items):
        rec = state.done.get(selection.start + offset)
        if rec is not None and rec.instruction != item.instruction:
            raise ConfigError(
                f"{directory}: item {rec.index} was answered for another instruction "
                f"({rec.instruction[:60]!r} vs {item.instruction[:60]!r}): the instructions file changed. "
                "Use another --output directory.")


def check_policy(state: CheckpointState, policy: OnTooLong, directory: Path) -> None:
    """The generator name tells the policy, so the answers must follow it: refuse to add to a
    directory holding items an --on-too-long fallback of another policy answered."""
    if policy not in ON_TOO_LONG:
        raise ConfigError(f"--on-too-long: one of {', '.join(ON_TOO_LONG)}, not {policy!r}")
    other = sorted((i, r.fallback) for i, r in state.done.items() if r.fallback not in (None, policy))
    if other:
        raise ConfigError(f"{directory}: {len(other)} items (first: {other[0][0]}) were answered by "
                          f"--on-too-long {other[0][1]}; run with that policy, or use another --output directory")


def preflight(output_dir: str | Path, cfg: AppConfig, selection: Selection, generator: str,
              on_too_long: OnTooLong = "fail") -> int:
    """Check that `output_dir` can be resumed with this config and these instructions before
    loading any model (a 7B scorer takes minutes); returns how many items are already done.
    `run_alpaca_eval` repeats the checks under the lock."""
    out = Path(output_dir)
    state = read_checkpoint(out)
    if state.header is not None:
        check_header(state.header, out, fingerprint=config_fingerprint(cfg), generator=generator)
    check_against_dataset(state, selection, out)
    check_policy(state, on_too_long, out)
    return sum(1 for i in selection.indices if i in state.done)


@dataclass
class _Tally:
    """What this invocation did, for the summary."""

    attempted: int = 0
    answered: int = 0
    failed: int = 0


async def _answer_pending(client: GuidedClient, ckpt: Checkpoint, pending: list[tuple[int, Instruction]],
                          concurrency: int, bar: ProgressBar | None, spent_before_usd: float,
                          billed_before: Usage, budget: Budget | None, policy: OnTooLong) -> _Tally:
    """Run the searches; every result goes to the checkpoint the moment it arrives. Items refused
    as too long for the guide go, after the rest, to the --on-too-long fallback (unless `fail`)."""
    tally = _Tally(attempted=len(pending))
    prices = client.config.upstream.prices
    too_long: list[tuple[int, str]] = []

    def record(rec: ItemRecord) -> None:
        ckpt.append(rec)
        if rec.status == "ok":
            tally.answered += 1
        else:
            tally.failed += 1
            log.warning("item %d failed: %s", rec.index, rec.error)
        if bar is not None:
            spent = client.usage.usage - billed_before
            bar.update(ok=rec.status == "ok", spent_usd=spent_before_usd + cost_usd(spent, prices))

    gen = client.generate_many([it.instruction for _, it in pending], concurrency=concurrency, budget=budget)
    async with contextlib.aclosing(gen):
        async for g in gen:
            if policy != "fail" and is_too_long(g.error):
                too_long.append((g.index, pending[g.index][1].instruction))
                continue
            record(item_record(pending[g.index][0], pending[g.index][1], g, client, policy))
    if too_long:
        log.info("%d items do not fit the guide: answering them --on-too-long %s", len(too_long), policy)
        fallback = answer_too_long(client, too_long, policy, concurrency=concurrency, budget=budget)
        async with contextlib.aclosing(fallback):
            async for g, cut in fallback:
                index, item = pending[g.index]
                record(item_record(index, item, g, client, policy, fallback=policy, cut_chars=cut))
    return tally


def _write_results(state: CheckpointState, selection: Selection, out: Path, name: str) -> tuple[
        list[ItemRecord], list[Failure], Path | None, Path | None]:
    """model_outputs.json (a shard's named part) when every item has an answer; otherwise no such
    file at all, and when every failure left is permanent, the answered items' rows as
    model_outputs.partial.json. Returns (answered records, failures, outputs, partial outputs)."""
    done = [state.done[i] for i in selection.indices if i in state.done]
    failures = [Failure(index=i, error=state.failed[i].error if i in state.failed else None,
                        permanent=i in state.failed and state.failed[i].permanent)
                for i in selection.indices if i not in state.done]
    # The answer without a completion's leading space ("Output: The..."), as the chat endpoint gives it.
    rows = [OutputRow(instruction=item.instruction, output=state.done[i].output.lstrip(), generator=name,
                      dataset=item.dataset).model_dump()
            for i, item in zip(selection.indices, selection.items) if i in state.done]
    path, partial = out / outputs_name(selection.shard), out / partial_name(selection.shard)
    keep_partial = bool(failures) and bool(rows) and all(f.permanent for f in failures)
    for stale, keep in ((path, not failures), (partial, keep_partial)):
        if stale.exists() and not keep:
            stale.unlink()  # derived data: a stale file could be judged as if it were this run's
            log.info("removed %s: it is not this run's", stale)
    if not failures:
        write_json_atomic(path, rows)
        return done, failures, path, None
    if keep_partial:
        write_json_atomic(partial, rows)
        return done, failures, None, partial
    return done, failures, None, None


async def run_alpaca_eval(
    client: GuidedClient,
    selection: Selection,
    output_dir: str | Path,
    *,
    concurrency: int = 8,
    generator: str | None = None,
    progress: bool | TextIO = True,
    max_cost_usd: float | None = None,
    on_too_long: OnTooLong = "fail",
) -> RunSummary:
    """Answer every item of `selection` not answered yet in `output_dir`; `client` must be open.

    `max_cost_usd` caps what this invocation spends upstream (at the upstream's prices): once it
    is spent no item starts, and items it cut short are recorded as failed, so the next run
    (with a new budget) answers exactly those. `on_too_long`: what to do with an instruction
    that does not fit the guide (proxy.alpaca_eval.policy).

    Returns the summary (also written to summary.json); `complete` is False when some item
    failed: running again retries those, which mends the retryable ones (`permanent` False).
    `progress`: a bar on stderr (True), on the given stream, or none (False).
    """
    if concurrency < 1:
        raise ConfigError("--concurrency: must be at least 1")
    out = Path(output_dir)
    cfg = client.config
    scorer_label = client.scorer.name if client.scorer is not None and cfg.scorer is None else None
    name = generator or generator_name(cfg, scorer_label=scorer_label, on_too_long=on_too_long)
    fingerprint = config_fingerprint(cfg)
    t0 = time.perf_counter()
    with Checkpoint.open(out, fingerprint=fingerprint, generator=name) as ckpt:
        check_against_dataset(ckpt.state, selection, out)
        check_policy(ckpt.state, on_too_long, out)
        pending = [(i, it) for i, it in zip(selection.indices, selection.items) if i not in ckpt.state.done]
        resumed = len(selection) - len(pending)
        resumed_cost = sum(ckpt.state.done[i].cost_usd for i in selection.indices if i in ckpt.state.done)
        bar = None
        if progress is not False:
            bar = ProgressBar(len(selection), done=resumed, cost_usd=resumed_cost,
                              stream=None if progress is True else progress)
            bar.draw(force=True)
        billed_before = client.usage.usage
        try:
            budget = Budget(max_usd=max_cost_usd, prices=cfg.upstream.prices) if max_cost_usd is not None else None
            tally = await _answer_pending(client, ckpt, pending, concurrency, bar, resumed_cost, billed_before, budget,
                                          on_too_long)
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
        done, failures, outputs, partial = _write_results(ckpt.state, selection, out, name)
        fallbacks: dict[str, list[int]] = {}
        for rec in done:
            if rec.fallback is not None:
                fallbacks.setdefault(rec.fallback, []).append(rec.index)
        billed = client.usage.usage - billed_before
        summary = RunSummary(
            generator=name, fingerprint=fingerprint, complete=not failures, items=len(selection), done=len(done),
            failed=len(failures), resumed=resumed, selection=SelectionInfo.of(selection), stats=ItemStats.of(done),
            this_run=ThisRun(attempted=tally.attempted, answered=tally.answered, failed=tally.failed,
                             billed_prompt_tokens=billed.prompt_tokens,
                             billed_completion_tokens=billed.completion_tokens,
                             billed_cost_usd=cost_usd(billed, cfg.upstream.prices), wall_s=round(wall, 3),
                             concurrency=concurrency, billed_cached_tokens=billed.cached_tokens,
                             billed_cache_write_tokens=billed.cache_write_tokens),
            failures=failures,
            model_outputs=None if outputs is None else str(outputs.resolve()),
            alpaca_eval_command=None if outputs is None else alpaca_eval_command(
                outputs, reference_outputs_file(selection.source)),
            on_too_long=on_too_long, permanent_failures=sum(f.permanent for f in failures), fallbacks=fallbacks,
            partial_outputs=None if partial is None else str(partial.resolve()),
        )
        write_json_atomic(out / SUMMARY_NAME, summary.model_dump())
    return summary
