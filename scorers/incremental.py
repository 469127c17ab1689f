"""Incremental scoring: each model runs only the tokens no cached prefix already covers.

A score request is whole response texts (the search never sends deltas), so each text is
re-tokenized with the prompt and matched against the session's cached prefixes on the token
level. The longest shared run of tokens is reused; everything after it is run, in one padded
forward pass that mixes rows from many sessions. Matching on tokens rather than text is what
makes seams exact: when appending a chunk changes how the parent's last tokens are cut (a chunk
ending mid-word, on whitespace, inside a multi-byte character), the shared run simply ends
earlier, the cache is cut there, and the differing tokens are run again. The result is the same
sum of log-probabilities a full recompute gives, up to float rounding. A text too long for the
positions is scored as the prefix scorers.room fits, as the full recompute scores it.

This module is the engine that runs gathered requests on the worker thread: it encodes them,
plans rows (scorers.incremental_rows) in up to two phases, first long runs that several new
sequences share (a new session's prompt, or a parent recomputed after its cache was evicted),
then each sequence's own tokens on top, runs them (scorers.incremental_forward) and sums the
scores from the prefixes they leave in the session caches.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from scorers.incremental_forward import run_rows
from scorers.incremental_rows import Row, plan_row, plan_row_batches
from scorers.kv_cache import CachePool, Prefix, SessionCache, SideCache, common_prefix, key_of
from scorers.reading import PromptEncoding
from scorers.room import fit_response
from scorers.scoring_model import ScoringModel

MIN_SHARED = 16
"""A run shared by several new sequences gets its own first-phase row when it saves this many tokens.
Below that, one more forward pass costs more than the duplicated tokens (siblings that happen to
start with the same word are not worth a phase)."""


@dataclass(eq=False)
class ScoreJob:
    """One `session.score` call as the worker sees it."""

    cache: SessionCache
    prompt_texts: tuple[str, str]
    texts: list[str]
    finished: list[bool]


@dataclass
class _Entry:
    finished: bool
    keys: tuple[bytes, ...]
    boundaries: tuple[int, ...]


@dataclass
class _Target:
    sm: ScoringModel
    side: SideCache
    ids: np.ndarray
    gen: int


@dataclass
class EngineStats:
    forward_calls: int = 0
    rows: int = 0
    rollbacks: int = 0
    shared_rows: int = 0
    """First-phase rows for runs shared by several new sequences."""
    hits: int = 0
    """Sequences already cached whole (re-scored texts, finished texts whose prefix exists)."""


class IncrementalEngine:
    """Runs a gathered list of score jobs on the worker thread: plan, forward, sum, prune, evict."""

    def __init__(self, pair: tuple[ScoringModel, ScoringModel], pool: CachePool, *, batch_size: int,
                 max_batch_tokens: int) -> None:
        self.pair = pair
        self.pool = pool
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.stats = EngineStats()

    def run(self, jobs: Sequence[ScoreJob]) -> list[list[float] | BaseException]:
        """Scores for every job, or the exception that job alone raised; never call from the event loop."""
        with torch.inference_mode():
            return self._run(jobs)

    def _run(self, jobs: Sequence[ScoreJob]) -> list[list[float] | BaseException]:
        results: list[list[float] | BaseException | None] = [None] * len(jobs)
        planned: list[tuple[int, ScoreJob, list[_Entry | None]]] = []
        targets: dict[tuple[int, bytes], _Target] = {}
        for j, job in enumerate(jobs):
            try:
                entries = self._encode(job, targets)
            except Exception as e:  # this request alone is bad (closed, a prompt too long, no context)
                results[j] = e
                continue
            planned.append((j, job, entries))
            self.pool.touch(job.cache)
        caches = list({id(job.cache): job.cache for _, job, _ in planned}.values())
        try:
            resolved = self._materialize(list(targets.values()), caches)
            for j, job, entries in planned:
                results[j] = [self._total(resolved, job.cache, e) for e in entries]
        except Exception as e:  # a forward failed: every request in it fails
            for j, _, _ in planned:
                results[j] = e
        for cache in caches:
            cache.prune_generations()
        self.pool.evict()
        return [r if r is not None else RuntimeError("not scored") for r in results]

    def _encode(self, job: ScoreJob, targets: dict[tuple[int, bytes], _Target]) -> list[_Entry | None]:
        cache = job.cache
        if cache.closed:
            raise RuntimeError("scoring session is closed")
        if cache.prompts is None:
            cache.prompts = tuple(sm.encode_prompt(t) for sm, t in zip(self.pair, job.prompt_texts))
        prompts: tuple[PromptEncoding, ...] = cache.prompts
        entries: list[_Entry | None] = []
        found: list[tuple[tuple[int, bytes], _Target]] = []
        # The texts of one request are siblings: their generation counts from earlier requests only.
        gens = [cache.generation(text) for text in job.texts]
        for text, finished, gen in zip(job.texts, job.finished, gens):
            if not text and not finished:
                entries.append(None)  # nothing to score: 0.0 without a forward
                continue
            fitted = fit_response(self.pair, prompts, text, finished)  # clipped to the positions (scorers.room)
            if not fitted.text and not fitted.finished:
                entries.append(None)
                continue
            keys, bounds = [], []
            for sm, side, enc in zip(self.pair, cache.sides, fitted.seqs):
                if fitted.finished:
                    sm.eos_id()  # a clear error now rather than a KeyError later
                ids = np.asarray(enc.ids, dtype=np.int64)
                key = key_of(ids)
                keys.append(key)
                bounds.append(enc.boundary)
                found.append(((id(side), key), _Target(sm, side, ids, gen)))
            cache.note(text, gen, tuple(keys))
            entries.append(_Entry(fitted.finished, tuple(keys), tuple(bounds)))
        for k, t in found:  # only once the whole request encoded without error
            if k in targets:
                targets[k].gen = max(targets[k].gen, t.gen)
            else:
                targets[k] = t
        return entries

    def _materialize(self, targets: list[_Target], caches: list[SessionCache]) -> dict[tuple[int, bytes], Prefix]:
        """Make sure a prefix exists for every target, running as few tokens as possible."""
        missing = [t for t in targets if t.side.get(t.ids) is None]
        self._run_phase(self._shared_rows(missing), caches)
        rows: list[Row] = []
        for t in missing:
            row = plan_row(t.sm, t.side, t.ids, t.gen)
            if row is not None:
                rows.append(row)
        self.stats.hits += len(targets) - len(rows)
        self._run_phase(rows, caches)
        # Eviction during the phases spares these sessions, so every target is cached now.
        return {(id(t.side), key_of(t.ids)): t.side.prefixes[key_of(t.ids)] for t in targets}

    def _shared_rows(self, missing: list[_Target]) -> list[Row]:
        """First-phase rows: runs that several new sequences share beyond their common cached base."""
        groups: dict[tuple[int, int], list[tuple[_Target, Row]]] = {}
        for t in missing:
            row = plan_row(t.sm, t.side, t.ids, t.gen)
            if row is not None:
                groups.setdefault((id(t.side), id(row.base)), []).append((t, row))
        rows: list[Row] = []
        for members in groups.values():
            if len(members) < 2:
                continue
            first = members[0][0].ids
            shared = min(common_prefix(first, t.ids) for t, _ in members[1:])
            reused = max(r.start for _, r in members)
            if shared - reused < MIN_SHARED:
                continue
            t0 = members[0][0]
            gen = max(min(t.gen for t, _ in members) - 1, 0)
            row = plan_row(t0.sm, t0.side, first[:shared].copy(), gen)
            if row is not None:
                rows.append(row)
        self.stats.shared_rows += len(rows)
        return rows

    def _run_phase(self, rows: list[Row], caches: list[SessionCache]) -> None:
        if not rows:
            return
        self.pool.evict(need=sum(r.n_new for r in rows), protect=caches)
        by_model: dict[int, list[Row]] = {}
        for r in rows:
            by_model.setdefault(id(r.sm.model), []).append(r)
        for group in by_model.values():
            model = group[0].sm.model
            window = getattr(model.config, "sliding_window", None)
            for batch in plan_row_batches(group, self.batch_size, self.max_batch_tokens,
                                          window if isinstance(window, int) else None):
                self._run_batch(model, batch)

    def _run_batch(self, model: PreTrainedModel, batch: list[Row]) -> list[Prefix]:
        prefixes = run_rows(model, batch, batch[0].sm.pad_id, self.pool)
        self.stats.forward_calls += 1
        self.stats.rows += len(batch)
        for r, prefix in zip(batch, prefixes):
            r.sm.tokens_run += r.n_new
            self.stats.rollbacks += int(r.rollback)
            r.side.add(prefix)
        return prefixes

    def _total(self, resolved: dict[tuple[int, bytes], Prefix], cache: SessionCache, entry: _Entry | None) -> float:
        """log p_tuned - log p_untuned of one response, from its two prefixes."""
        if entry is None:
            return 0.0
        sides = []
        for sm, side, key, boundary in zip(self.pair, cache.sides, entry.keys, entry.boundaries):
            prefix = resolved[(id(side), key)]
            total = float(prefix.logp[boundary:].sum().item())
            if entry.finished:
                total += float(prefix.next_logp[sm.eos_id()].item())
            sides.append(total)
        return sides[0] - sides[1]
