"""The small model's own continuations of raw-text openings, and their log-probabilities.

Both follow the guide's scoring setting exactly: the opening is the raw text (the "raw" template,
no system turn), the continuation is what comes after it, and a continuation's tokens are the
ones `ScoringModel.encode_response` would score. Training on anything else would teach the guide
about text it is never asked to judge.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from scorers.scoring_model import ScoringModel
from scorers.templates import RAW

log = logging.getLogger(__name__)


def raw_side(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> ScoringModel:
    """One side of the guide as the film-review task configures it (raw text, no system turn)."""
    return ScoringModel(model=model, tokenizer=tokenizer, chat_template=RAW, system_prompt=None)


@torch.no_grad()
def sample_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int = 64,
) -> list[list[str]]:
    """`k` sampled continuations of each prompt (text after the prompt, special tokens dropped).

    Seeded once, then drawn in a fixed order of batches, so the same settings on the same
    machine give the same samples.
    """
    side = raw_side(model, tokenizer)
    pad_id = side.pad_id
    per_batch = max(1, batch_size // k)
    torch.manual_seed(seed)
    out: list[list[str]] = []
    began = time.perf_counter()
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        encoded = [side.encode_prompt(side.render([{"role": "user", "content": p}])).ids for p in chunk]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        generated = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
            num_return_sequences=k, pad_token_id=pad_id,
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        out.extend(texts[i * k:(i + 1) * k] for i in range(len(chunk)))
        log.info("sampled %d/%d prompts (%.0f s)", len(out), len(prompts), time.perf_counter() - began)
    return out


@torch.no_grad()
def continuation_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, texts: Sequence[str]
) -> list[float]:
    """Sum of log p(token) over each unfinished continuation's tokens, as the scorer counts them."""
    side = raw_side(model, tokenizer)
    encoded_prompt = side.encode_prompt(side.render([{"role": "user", "content": prompt}]))
    rows = [side.encode_response(encoded_prompt, text, finished=False) for text in texts]
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([r.ids + [side.pad_id] * (width - len(r.ids)) for r in rows], device=model.device)
    mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows], device=model.device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return [float(logp[i, r.boundary - 1:len(r.ids) - 1].sum()) for i, r in enumerate(rows)]
