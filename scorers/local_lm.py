"""A local causal LM answering OpenAI completion requests: the model side of `w2s serve-local`.

This is how the offline demo gets a real "strong" model with no API, and how a user guides a
white-box model they host themselves through exactly the code path a paid API takes. Sampling
runs on one worker thread (the event loop keeps serving), and each request seeds the
generator from its own `seed`, so answers do not depend on what else is being served.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from proxy.config import ModelSpec
from proxy.loopback import Choice, CompletionParams, stable_int
from scorers.loading import load_causal_lm, pick_device_dtype
from scorers.scoring_model import needs_bos


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class LocalCausalLM:
    """transformers `generate` behind the completions protocol (n, max_tokens, stop, temperature,
    top_p, seed; finish_reason "stop" on EOS or a stop string, else "length")."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="w2s-local-lm")

    @classmethod
    def load(cls, spec: ModelSpec, device: str = "auto", dtype: str = "auto") -> "LocalCausalLM":
        dev, dt = pick_device_dtype(device, dtype)
        return cls(*load_causal_lm(spec, dev, dt))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def complete(self, params: CompletionParams) -> tuple[list[Choice], int]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._generate, params)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=needs_bos(self.tokenizer, text))["input_ids"])

    def _generate(self, params: CompletionParams) -> tuple[list[Choice], int]:
        tok = self.tokenizer
        prompt_ids = self._encode(params.prompt)
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        sampling: dict[str, object] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        if params.seed is not None:
            # Seeded per (seed, prompt): the prompts of one request share its seed, and must not
            # share their random draws (the beams of a step would sample in lockstep).
            torch.manual_seed(stable_int("sample", params.seed, params.prompt) % 2**63)
        else:
            torch.seed()
        ids = torch.tensor([prompt_ids], device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                num_return_sequences=params.n, eos_token_id=eos, pad_token_id=pad, **sampling,
            )
        return [self._choice(row[len(prompt_ids):].tolist(), eos, params) for row in out], len(prompt_ids)

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
