"""The reference scoring path: every (prompt + response) sequence run whole, from scratch.

This is what the paper's code does at every chunk. It stays as `incremental: false`, the
baseline the incremental path is measured and tested against; it shares its encoding with the
incremental path (scorers.scoring_model) and its batch planning (`plan_batches`).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from scorers.batch_plan import plan_batches  # re-exported: scorers.implicit imports it from here
from scorers.reading import PromptEncoding, ResponseTokens
from scorers.scoring_model import ScoringModel, max_positions


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def forward_batch(model: PreTrainedModel, seqs: Sequence[ResponseTokens], pad_id: int) -> list[float]:
    """One padded forward pass: for each sequence, sum of log p(ids[i] | ids[:i]) over i in [boundary, len).

    Right padding with an attention mask leaves every real token's positions and attention
    exactly as without padding. Only logits from the earliest boundary on are computed (the
    prompt's logits are never needed), and log_softmax runs in float32 whatever the model
    dtype; sums are taken in float64 so long responses do not lose precision.
    """
    device = model.device
    width = max(len(s.ids) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        attention[row, : len(s.ids)] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)

    first = min(s.boundary for s in seqs) - 1  # first position whose logits predict a scored token
    kwargs: dict[str, object] = {}
    offset = 0
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = width - first
        offset = first
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, **kwargs).logits
    # logits[:, j] is at position offset + j and predicts the token at offset + j + 1.
    logits = logits[:, : width - 1 - offset].float()
    targets = input_ids[:, offset + 1 :]
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    positions = torch.arange(offset + 1, width, device=device)
    starts = torch.tensor([s.boundary for s in seqs], device=device).unsqueeze(1)
    ends = torch.tensor([len(s.ids) for s in seqs], device=device).unsqueeze(1)
    scored = (positions >= starts) & (positions < ends)
    sums = torch.where(scored, token_logp.double(), torch.zeros((), dtype=torch.float64, device=device)).sum(-1)
    return sums.tolist()


def batched_logprobs(
    model: PreTrainedModel,
    seqs: Sequence[ResponseTokens],
    pad_id: int,
    batch_size: int,
    max_batch_tokens: int,
) -> list[float]:
    """Summed response log-probability of every sequence, in input order.

    Sequences with nothing to score (an empty unfinished response) are 0.0 without a forward.
    """
    limit = max_positions(model)
    for s in seqs:
        if limit is not None and len(s.ids) > limit:
            raise ValueError(f"sequence of {len(s.ids)} tokens exceeds the model's {limit} positions")
    out = [0.0] * len(seqs)
    todo = [i for i, s in enumerate(seqs) if s.n_scored > 0]
    for batch in plan_batches([len(seqs[i].ids) for i in todo], batch_size, max_batch_tokens):
        indices = [todo[j] for j in batch]
        for i, value in zip(indices, forward_batch(model, [seqs[i] for i in indices], pad_id)):
            out[i] = value
    return out


def response_logprobs(
    sm: ScoringModel,
    prompt: PromptEncoding,
    texts: Sequence[str],
    finished: Sequence[bool],
    batch_size: int,
    max_batch_tokens: int,
) -> list[float]:
    """log p_model(text | prompt) (+ EOS where finished) for each text, one model.

    Every token of every sequence goes through the model, and is counted in `sm.tokens_run`.
    """
    seqs = [sm.encode_response(prompt, t, f) for t, f in zip(texts, finished)]
    out = batched_logprobs(sm.model, seqs, sm.pad_id, batch_size, max_batch_tokens)
    sm.tokens_run += sum(len(s.ids) for s in seqs if s.n_scored > 0)
    return out
