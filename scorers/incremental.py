"""Incremental scoring: each model runs only the tokens no cached prefix already covers.

A score request is whole response texts (the search never sends deltas), so each text is
re-tokenized with the prompt and matched against the session's cached prefixes on the token
level. The longest shared run of tokens is reused; everything after it is run, in one padded
forward pass that mixes rows from many sessions. Matching on tokens rather than text is what
makes seams exact: when appending a chunk changes how the parent's last tokens are cut (a chunk
ending mid-word, on whitespace, inside a multi-byte character), the shared run simply ends
earlier, the cache is cut there, and the differing tokens are run again. The result is the same
sum of log-probabilities a full recompute gives, up to float rounding.

A batch row is (cached past, new tokens). Past caches of different lengths are stacked
left-aligned with an attention mask over past + new, and position ids continue each row's own
past, so every real token sees exactly its own prefix at its own positions. Rows are planned in
up to two phases: first long runs that several new sequences share (a new session's prompt, or
a parent recomputed after its cache was evicted), then each sequence's own tokens on top.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from scorers.kv_cache import Chain, CachePool, Prefix, SessionCache, SideCache, common_prefix, cut_chain, key_of
from scorers.reading import PromptEncoding
from scorers.scoring_model import ScoringModel

MIN_SHARED = 16
"""A run shared by several new sequences gets its own first-phase row when it saves this many tokens.
Below that, one more forward pass costs more than the duplicated tokens (siblings that happen to
start with the same word are not worth a phase)."""


@dataclass(eq=False)
class Row:
    """Tokens ids[start:] to run on top of `chain` (which covers ids[:start])."""

    sm: ScoringModel
    side: SideCache
    ids: np.ndarray
    start: int
    chain: Chain
    head: torch.Tensor
    """logp of ids[:start + 1], known before the forward (float64, CPU)."""
    gen: int
    base: Prefix | None
    rollback: bool
    """The cached base had tokens past `start` that this row runs again (a seam changed)."""

    @property
    def n_new(self) -> int:
        return len(self.ids) - self.start


def plan_row(sm: ScoringModel, side: SideCache, ids: np.ndarray, gen: int) -> Row | None:
    """The cheapest row that produces a prefix for `ids`; None when it is already cached."""
    base, shared = side.best(ids)
    if base is None:
        return Row(sm, side, ids, 0, (), torch.zeros(1, dtype=torch.float64), gen, None, False)
    if shared == len(base):
        if shared == len(ids):
            return None
        # The base's next-token distribution scores the first new token: nothing is rerun.
        first = torch.tensor([base.next_logp[int(ids[shared])].item()], dtype=torch.float64)
        return Row(sm, side, ids, shared, base.chain, torch.cat([base.logp, first]), gen, base, False)
    # Rollback: keep the cache up to the last shared token, which runs again to predict the first differing one.
    start = shared - 1
    return Row(sm, side, ids, start, cut_chain(base.chain, start), base.logp[:shared].clone(), gen, base, True)


def plan_row_batches(rows: Sequence[Row], batch_size: int, max_batch_tokens: int, window: int | None) -> list[list[Row]]:
    """Greedy packing, longest past first, by the padded area rows * (max past + max new).

    A sliding-window model only gets multi-row batches narrower than its window: left-aligned
    pasts leave holes, and the window is measured in cache slots, so a wider stack could mask
    keys that are within the window in real positions.
    """
    order = sorted(rows, key=lambda r: (r.start, r.n_new), reverse=True)
    batches: list[list[Row]] = []
    current: list[Row] = []
    past = new = 0
    for r in order:
        p, n = max(past, r.start), max(new, r.n_new)
        fits = (
            len(current) + 1 <= batch_size
            and (len(current) + 1) * (p + n) <= max_batch_tokens
            and (window is None or p + n <= window)
        )
        if current and not fits:
            batches.append(current)
            current, p, n = [], r.start, r.n_new
        current.append(r)
        past, new = p, n
    if current:
        batches.append(current)
    return batches


def run_rows(model: PreTrainedModel, rows: Sequence[Row], pad_id: int, pool: CachePool) -> list[Prefix]:
    """One forward pass over rows with cached pasts; returns the prefix each row completes."""
    device = model.device
    starts = [r.start for r in rows]
    news = [r.n_new for r in rows]
    width_past, width_new = max(starts), max(news)
    batch = len(rows)
    input_ids = torch.full((batch, width_new), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width_past + width_new), dtype=torch.long)
    positions = torch.zeros((batch, width_new), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : news[i]] = torch.from_numpy(r.ids[r.start :])
        mask[i, : starts[i]] = 1
        mask[i, width_past : width_past + news[i]] = 1
        positions[i, : news[i]] = torch.arange(starts[i], starts[i] + news[i])

    cache = DynamicCache()
    buffer = None
    if width_past:
        ref = next(seg.kv for r in rows for seg, _ in r.chain)
        layers, _, heads, _, head_dim = ref.shape
        # Past and new tokens in one buffer per layer: pasts are copied in once, the model writes
        # the new keys/values behind them, and nothing is concatenated.
        buffer = torch.empty((layers, 2, batch, heads, width_past + width_new, head_dim), dtype=ref.dtype, device=device)
        for i, r in enumerate(rows):
            at = 0
            for seg, used in r.chain:
                buffer[:, :, i, :, at : at + used] = seg.kv[:, :, :, :used]
                at += used
            buffer[:, :, i, :, at:width_past] = 0  # masked holes must still be finite (0 * NaN is NaN)
        cache.layers = [_InPlaceLayer(buffer[layer, 0], buffer[layer, 1], width_past) for layer in range(layers)]

    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
    )
    # [layers, 2, batch, heads, width_new, head_dim]
    new_kv = buffer[..., width_past:, :] if buffer is not None else _stacked_new_kv(out.past_key_values)
    prefixes: list[Prefix] = []
    for i, r in enumerate(rows):
        n = news[i]
        logp_rows = torch.log_softmax(out.logits[i, :n].float(), dim=-1)
        if n > 1:
            targets = torch.from_numpy(r.ids[r.start + 1 :]).to(device)
            new_logp = logp_rows[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
            logp = torch.cat([r.head, new_logp])
        else:
            logp = r.head
        seg = pool.segment(new_kv[:, :, i, :, :n].clone())
        prefixes.append(Prefix(r.ids, r.chain + ((seg, n),), logp, logp_rows[-1].clone(), r.gen))
    return prefixes


class _InPlaceLayer(DynamicLayer):
    """A cache layer whose past already sits in a buffer with room for the new tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: int) -> None:
        super().__init__()
        self._buffer = (keys, values)
        self._past = past
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys[:, :, :past], values[:, :, :past]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._buffer
        end = self._past + key_states.shape[-2]
        keys[:, :, self._past : end] = key_states
        values[:, :, self._past : end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


def _stacked_new_kv(cache: object) -> torch.Tensor:
    """Keys/values of a forward that started from an empty cache, stacked over layers."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise ValueError("incremental scoring needs a model that returns a DynamicCache of keys/values "
                         "(set scorer.incremental: false for this model)")
    shapes = {tuple(layer.keys.shape) for layer in layers}
    if len(shapes) != 1:
        raise ValueError("incremental scoring needs the same key/value shape in every layer "
                         "(set scorer.incremental: false for this model)")
    return torch.stack([torch.stack((layer.keys, layer.values)) for layer in layers])


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
            except Exception as e:  # this request alone is bad (closed, too long, no context)
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
            keys, bounds = [], []
            for sm, side, prompt in zip(self.pair, cache.sides, prompts):
                enc = sm.encode_response(prompt, text, False)
                sm.check_length(enc)
                if finished:
                    sm.eos_id()  # a clear error now rather than a KeyError later
                ids = np.asarray(enc.ids, dtype=np.int64)
                key = key_of(ids)
                keys.append(key)
                bounds.append(enc.boundary)
                found.append(((id(side), key), _Target(sm, side, ids, gen)))
            cache.note(text, gen, tuple(keys))
            entries.append(_Entry(finished, tuple(keys), tuple(bounds)))
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
