"""The paper's scorer: the implicit reward log p_tuned(response) - log p_untuned(response).

Each model reads the prompt through its own chat template and the response through its own
tokenizer, so the pair need not share a vocabulary with each other or with the upstream. The
response's log-probability is summed from the first token that differs from the prompt's own
tokenization: a token merged across the prompt/response seam belongs to the response, which is
what the model would have had to generate.

Work is split so that a later incremental version can reuse the pieces: per model,
`ScoringModel.encode_prompt` / `encode_response` (text -> token ids and a boundary), then
`batched_logprobs` (token ids -> one summed log-probability per sequence). All of it runs on one
worker thread per scorer; the event loop only awaits.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from proxy.config import ModelSpec, ScorerConfig
from scorers.base import ChatMessage, Scorer, ScorerPrompt, ScoringSession, as_messages
from scorers.loading import load_causal_lm, pick_device_dtype
from scorers.templates import resolve_template


@dataclass(frozen=True)
class PromptEncoding:
    """A rendered prompt and its token ids, tokenized the way every response will be."""

    text: str
    ids: list[int]
    add_special_tokens: bool


@dataclass(frozen=True)
class ResponseTokens:
    """Token ids of prompt + response (+ EOS when finished); positions [boundary, len) are scored."""

    ids: list[int]
    boundary: int

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.boundary


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class ScoringModel:
    """One side of the pair: a model, its tokenizer, and how it wants a chat rendered."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None = None
    """Resolved jinja, or None for the tokenizer's own template."""
    system_prompt: str | None = ""
    """System turn prepended when the messages have none; None = no system turn."""
    name: str = "model"

    @classmethod
    def from_spec(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> "ScoringModel":
        return cls(
            model=model,
            tokenizer=tokenizer,
            chat_template=resolve_template(spec.chat_template),
            system_prompt=spec.system_prompt,
            name=spec.path,
        )

    @property
    def pad_id(self) -> int:
        """Any id will do for padding (it is masked out), but it must be a valid embedding row."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text this model would see before writing its answer."""
        msgs = list(messages)
        if self.system_prompt is not None and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": self.system_prompt}, *msgs]
        try:
            rendered = self.tokenizer.apply_chat_template(
                msgs, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja errors and "no chat template" alike need the model's name
            hint = " (set chat_template, e.g. 'raw' for a base model, or system_prompt: null)"
            raise ValueError(f"{self.name}: cannot render the chat prompt: {e}{hint}") from e
        if not isinstance(rendered, str):
            raise ValueError(f"{self.name}: the chat template did not render to a string")
        return rendered

    def encode_prompt(self, prompt_text: str) -> PromptEncoding:
        """Tokenize the rendered prompt; a template that writes its own BOS must not get a second."""
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and prompt_text.startswith(bos))
        return PromptEncoding(prompt_text, self._tokenize(prompt_text, add_special), add_special)

    def encode_response(self, prompt: PromptEncoding, text: str, finished: bool) -> ResponseTokens:
        """Ids of prompt + `text` (+ EOS if finished) and where the response starts on the token level.

        The boundary is the common prefix with the prompt's own ids, so a seam token merged
        across the boundary counts as response. At least one context token (e.g. BOS) is needed
        to predict the first response token.
        """
        full = self._tokenize(prompt.text + text, prompt.add_special_tokens) if text else list(prompt.ids)
        boundary = common_prefix_len(full, prompt.ids)
        if boundary == 0:
            raise ValueError(
                f"{self.name}: the prompt gives no context token before the response "
                "(empty prompt and no BOS); cannot score the first response token"
            )
        if finished:
            full.append(self._eos_id())
        return ResponseTokens(full, boundary)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{self.name}: the tokenizer has no eos_token, so a finished response cannot be scored")
        return int(eos)


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group sequence indices, longest first, so that no batch exceeds either limit once padded.

    Sorting by length keeps padding small; a single sequence longer than `max_batch_tokens`
    still gets a batch of its own, since it cannot be split.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Longest first: the batch's padded width is its first member's length.
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > batch_size or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _max_positions(model: PreTrainedModel) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


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
    limit = _max_positions(model)
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
    """log p_model(text | prompt) (+ EOS where finished) for each text, one model."""
    seqs = [sm.encode_response(prompt, t, f) for t, f in zip(texts, finished)]
    return batched_logprobs(sm.model, seqs, sm.pad_id, batch_size, max_batch_tokens)


class ImplicitRewardSession(ScoringSession):
    """Scores responses to one prompt. Prompt rendering happens at open (errors surface early);
    tokenization and forwards happen on the scorer's worker thread."""

    def __init__(self, scorer: "ImplicitRewardScorer", messages: list[ChatMessage]) -> None:
        self._scorer = scorer
        self._prompt_texts: tuple[str, str] | None = (
            scorer.tuned.render(messages),
            scorer.untuned.render(messages),
        )
        self._prompts: tuple[PromptEncoding, PromptEncoding] | None = None

    @property
    def prompt_texts(self) -> tuple[str, str]:
        """The rendered prompt as (tuned, untuned) see it."""
        if self._prompt_texts is None:
            raise RuntimeError("scoring session is closed")
        return self._prompt_texts

    async def score(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        if self._prompt_texts is None:
            raise RuntimeError("scoring session is closed")
        if len(texts) != len(finished):
            raise ValueError(f"got {len(texts)} texts but {len(finished)} finished flags")
        if not texts:
            return []
        # Taken now, so a job already queued still runs if the scorer closes meanwhile.
        pair = self._scorer._pair()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._scorer._executor, self._score_blocking, pair, list(texts), [bool(f) for f in finished]
        )

    def _score_blocking(
        self, pair: tuple[ScoringModel, ScoringModel], texts: list[str], finished: list[bool]
    ) -> list[float]:
        """Runs on the worker thread: never call from the event loop."""
        limits = (self._scorer.batch_size, self._scorer.max_batch_tokens)
        with torch.inference_mode():
            prompts = self._encoded_prompts(pair)
            tuned, untuned = [
                response_logprobs(sm, prompt, texts, finished, *limits) for sm, prompt in zip(pair, prompts)
            ]
        return [t - u for t, u in zip(tuned, untuned)]

    def _encoded_prompts(self, pair: tuple[ScoringModel, ScoringModel]) -> tuple[PromptEncoding, PromptEncoding]:
        """Prompt ids, computed once per session on the worker (only that thread touches them)."""
        if self._prompts is None:
            texts = self.prompt_texts
            self._prompts = (pair[0].encode_prompt(texts[0]), pair[1].encode_prompt(texts[1]))
        return self._prompts

    def close(self) -> None:
        self._prompt_texts = None
        self._prompts = None


class ImplicitRewardScorer(Scorer):
    """Weak-to-strong guidance score: log p_tuned(response) - log p_untuned(response)."""

    name = "implicit"

    def __init__(
        self,
        tuned: ScoringModel,
        untuned: ScoringModel,
        *,
        batch_size: int = 8,
        max_batch_tokens: int = 16384,
    ) -> None:
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("batch_size and max_batch_tokens must be at least 1")
        self._models: tuple[ScoringModel, ScoringModel] | None = (tuned, untuned)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        # One worker: forwards of all sessions queue on it, so the device runs one at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="w2s-scorer")

    @classmethod
    def from_loaded(
        cls,
        tuned: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSpec],
        untuned: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSpec],
        *,
        batch_size: int = 8,
        max_batch_tokens: int = 16384,
    ) -> "ImplicitRewardScorer":
        """From (model, tokenizer, spec) triples already in memory (tests, notebooks)."""
        return cls(
            ScoringModel.from_spec(*tuned),
            ScoringModel.from_spec(*untuned),
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
        )

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> "ImplicitRewardScorer":
        """Load both models as the config says (blocking: call before serving, or off the loop)."""
        device, dtype = pick_device_dtype(cfg.device, cfg.dtype)
        attn = cfg.attn_implementation
        tuned = (*load_causal_lm(cfg.tuned, device, dtype, attn_implementation=attn), cfg.tuned)
        weights = ("path", "gguf_file", "revision")
        if cfg.tuned.model_dump(include=set(weights)) == cfg.untuned.model_dump(include=set(weights)):
            # A prompt-contrast pair: one set of weights, two templates or system prompts.
            untuned = (tuned[0], tuned[1], cfg.untuned)
        else:
            untuned = (*load_causal_lm(cfg.untuned, device, dtype, attn_implementation=attn), cfg.untuned)
        return cls.from_loaded(tuned, untuned, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens)

    @property
    def tuned(self) -> ScoringModel:
        return self._pair()[0]

    @property
    def untuned(self) -> ScoringModel:
        return self._pair()[1]

    def _pair(self) -> tuple[ScoringModel, ScoringModel]:
        if self._models is None:
            raise RuntimeError("scorer is closed")
        return self._models

    def open(self, prompt: ScorerPrompt) -> ImplicitRewardSession:
        return ImplicitRewardSession(self, as_messages(prompt))

    async def aclose(self) -> None:
        """Wait for queued forwards (off the loop), stop the worker and drop the models."""
        if self._models is None:
            return
        self._models = None
        await asyncio.to_thread(self._executor.shutdown, True)
