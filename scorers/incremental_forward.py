"""One padded forward pass over rows whose cached pasts differ in length.

Past caches of different lengths are stacked left-aligned with an attention mask over
past + new, and position ids continue each row's own past, so every real token sees exactly its
own prefix at its own positions. Pasts are copied once into a buffer with room for the new
tokens, which the model writes in place. Kept apart from the planning (scorers.incremental_rows)
because this is the one place that depends on transformers' cache internals.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from scorers.cache_argument import cache_argument, cache_of
from scorers.incremental_rows import Row
from scorers.kv_cache import CachePool, Prefix


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
        use_cache=True,
        **cache_argument(model, cache),
    )
    # [layers, 2, batch, heads, width_new, head_dim]
    new_kv = buffer[..., width_past:, :] if buffer is not None else _stacked_new_kv(cache_of(out))
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
