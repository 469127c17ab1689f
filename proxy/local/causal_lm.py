"""A transformers causal LM as a completions backend: the model side of `w2s serve-local`.

This is how the offline demo gets a real "strong" model with no API, and how a user guides a
white-box model they host themselves through exactly the code path a paid API takes.

Requests in flight together are sampled together: the prompts of every waiting request (each
with its n samples) go into one left-padded `generate` on the worker thread, up to
`max_batch_rows` rows, and each prompt's KV cache is computed once and copied to its n rows
rather than computed n times. (Gemma 3 270M on one CPU thread: 48 tokens/s in batches of 64
rows, against 26 for a lone n=16 request and 6 for n=1.) The event loop keeps serving
meanwhile. Sampling is done per row, not by
`generate`'s shared random stream: each row draws from its own generator, seeded by
(request seed, prompt, sample index), by inverse CDF on its own temperature and top-p. So a
seeded request gets the same samples whatever else is being served beside it, up to float
rounding in the padded forward: a batch shared with other prompts rounds the logits differently
in their last digits, which now and then moves a draw across the boundary between two tokens.
`max_batch_rows=1` decodes each request alone, in the same shapes every time, and so makes its
samples bit-identical, at the cost of throughput.
"""
from __future__ import annotations

import inspect
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from proxy.config import ModelSpec
from proxy.local.backend import DEFAULT_MAX_BATCH_ROWS, Choice, CompletionParams
from proxy.types import choice_seed, first_stop
from scorers.batcher import MicroBatcher
from scorers.cache_argument import cache_argument
from scorers.loading import load_causal_lm, pick_device_dtype
from scorers.reading import needs_bos


@dataclass
class _Row:
    request: int
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator


class _RowSampler(LogitsProcessor):
    """Samples each row's next token from its own generator and hands `generate` (in greedy
    mode) logits where only that token is finite: the per-row randomness `generate` lacks."""

    def __init__(self, rows: Sequence[_Row], device: torch.device) -> None:
        self.rows = rows
        self.temperature = torch.tensor([max(r.temperature, 1e-6) for r in rows], device=device).unsqueeze(1)
        self.greedy = torch.tensor([r.temperature <= 0 for r in rows], device=device)
        self.nucleus = [i for i, r in enumerate(rows) if r.temperature > 0 and r.top_p < 1.0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        probs = (logits - logits.amax(-1, keepdim=True)).exp_()  # unnormalized: the draw scales by the total
        for i in self.nucleus:  # keep the fewest most likely tokens whose mass reaches top_p
            p, order = probs[i].sort(descending=True)
            p = p / p.sum()
            drop = (p.cumsum(0) - p) >= self.rows[i].top_p
            probs[i, order[drop]] = 0.0
        cdf = probs.cumsum_(-1)
        u = torch.cat([torch.rand(1, generator=r.generator) for r in self.rows]).to(cdf.device)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).contiguous(), right=True).squeeze(1)
        picked = picked.clamp_(max=scores.shape[-1] - 1)
        picked = torch.where(self.greedy, scores.argmax(-1), picked)
        out = torch.full_like(scores, -float("inf"))
        out[torch.arange(len(self.rows), device=scores.device), picked] = 0.0
        return out


class _RowBudget(StoppingCriteria):
    """Each row stops at its own max_tokens (generate's own limit is the batch's largest)."""

    def __init__(self, prompt_len: int, budgets: Sequence[int], device: torch.device) -> None:
        self.prompt_len = prompt_len
        self.budgets = torch.tensor(list(budgets), device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_len) >= self.budgets  # type: ignore[return-value]


class LocalCausalLM:
    """transformers `generate` behind the completions protocol (n, max_tokens, stop, temperature,
    top_p, seed; finish_reason "stop" on EOS or a stop string, else "length")."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, batch_wait_ms: float = 5.0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="w2s-local-lm")
        self._batcher: MicroBatcher[CompletionParams, tuple[list[Choice], int]] = MicroBatcher(
            self._generate_many, self._executor, max_items=max_batch_rows, wait_s=batch_wait_ms / 1000.0,
            size=lambda p: p.n,
        )
        self.batches = 0
        """Padded generate calls run so far (fewer than requests: requests shared them)."""

    @classmethod
    def load(cls, spec: ModelSpec, device: str = "auto", dtype: str = "auto", **options: object) -> "LocalCausalLM":
        dev, dt = pick_device_dtype(device, dtype)
        return cls(*load_causal_lm(spec, dev, dt), **options)  # type: ignore[arg-type]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def complete(self, params: CompletionParams) -> tuple[list[Choice], int]:
        return await self._batcher.submit(params)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=needs_bos(self.tokenizer, text))["input_ids"])

    def _generate(self, params: CompletionParams) -> tuple[list[Choice], int]:
        """One request alone (blocking)."""
        out = self._generate_many([params])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def _generate_many(self, batch: list[CompletionParams]) -> list[tuple[list[Choice], int] | BaseException]:
        """Every request of `batch` in one padded generate, on the worker thread. A request that
        breaks the batch (e.g. a prompt too long for the model) is found by running each alone,
        so it fails by itself."""
        try:
            return list(self._run(batch))
        except Exception as e:
            if len(batch) == 1:
                return [e]
        results: list[tuple[list[Choice], int] | BaseException] = []
        for params in batch:
            try:
                results.append(self._run([params])[0])
            except Exception as e:
                results.append(e)
        return results

    def _rows(self, batch: list[CompletionParams]) -> list[_Row]:
        rows = []
        for r, params in enumerate(batch):
            ids = self._encode(params.prompt)
            for j in range(params.n):
                g = torch.Generator()
                # Seeded per (prompt, seed, sample): the prompts of one request share its seed, and
                # must not share their random draws (the beams of a step would sample in lockstep).
                seed = choice_seed(params.prompt, params.seed, j) if params.seed is not None else secrets.randbits(63)
                g.manual_seed(seed % 2**63)
                rows.append(_Row(r, ids, params.max_tokens, params.temperature, params.top_p, g))
        return rows

    def _run(self, batch: list[CompletionParams]) -> list[tuple[list[Choice], int]]:
        tok = self.tokenizer
        rows = self._rows(batch)
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        width = max(len(r.prompt_ids) for r in rows)
        device = self.model.device
        prompts = [self._first_ids(rows, r) for r in range(len(batch))]
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        per_row = torch.tensor([r.request for r in rows], device=device)
        with torch.inference_mode():
            cache = self._shared_prefill(ids, mask, per_row) if len(rows) > len(prompts) and width > 1 else None
            out = self.model.generate(
                input_ids=ids[per_row], attention_mask=mask[per_row], **cache_argument(self.model, cache),
                max_new_tokens=max(r.max_tokens for r in rows), do_sample=False, eos_token_id=eos, pad_token_id=pad,
                logits_processor=LogitsProcessorList([_RowSampler(rows, device)]),
                stopping_criteria=StoppingCriteriaList([_RowBudget(width, [r.max_tokens for r in rows], device)]),
                top_k=None, top_p=None, temperature=None,  # the model's own sampling defaults do not apply
            )
        self.batches += 1
        gen = out[:, width:].tolist()
        answers: list[tuple[list[Choice], int]] = [([], len(p)) for p in prompts]
        for row, g in zip(rows, gen):
            answers[row.request][0].append(self._choice(g[: row.max_tokens], eos, batch[row.request]))
        return answers

    def _shared_prefill(self, ids: torch.Tensor, mask: torch.Tensor, per_row: torch.Tensor) -> object:
        """The KV cache of every prompt but its last token, computed once per prompt and copied to
        each of its n rows (generate would run the prompt n times over); generate then runs the
        last token and samples on."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        prefix, prefix_mask = ids[:, :-1], mask[:, :-1]
        positions = (prefix_mask.cumsum(-1) - 1).clamp_(min=0)
        kwargs: dict[str, object] = {}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # only the cache is wanted
        self.model(input_ids=prefix, attention_mask=prefix_mask, position_ids=positions,
                   use_cache=True, **cache_argument(self.model, cache), **kwargs)
        cache.batch_select_indices(per_row)
        return cache

    @staticmethod
    def _first_ids(rows: list[_Row], request: int) -> list[int]:
        return next(r.prompt_ids for r in rows if r.request == request)

    def _choice(self, gen: list[int], eos: int | None, params: CompletionParams) -> Choice:
        ended = eos is not None and eos in gen
        if ended:
            gen = gen[: gen.index(eos)]
        text = self.tokenizer.decode(gen, skip_special_tokens=True)
        cut = first_stop(text, params.stop)
        if cut is not None:
            text = text[:cut]
            return Choice(text, "stop", len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return Choice(text, "stop" if ended else "length", len(gen))
