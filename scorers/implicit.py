"""The paper's scorer: the implicit reward log p_tuned(response) - log p_untuned(response).

Two ways to compute the same numbers:

- incremental (default): each session keeps, per model, the KV caches of the prompt and of every
  live beam, so a candidate runs only its new tokens (scorers.incremental); requests from all
  sessions are gathered into shared forward passes (scorers.batcher); cached tokens are bounded
  per scorer, least recently used sessions recomputing on next use (scorers.kv_cache).
- full recompute (`incremental=False`): every prompt + response runs whole at every call, as in
  the paper's code (scorers.full_recompute). Kept as the baseline for tests and benchmarks.

Both score a response too long for the models' positions as the longest prefix of its text that
fits on both sides (scorers.room), so a search never fails on a text that re-tokenizes longer
than the upstream's token count.

A prompt-contrast pair (one model, two system prompts or templates) is a pair whose two
ScoringModels share one model object; the incremental path then runs both sides' rows in the
same forward passes. All torch work runs on one worker thread per scorer; the event loop only
awaits.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from proxy.config import ModelSpec, ScorerConfig
from scorers.base import ChatMessage, Scorer, ScorerPrompt, ScoringSession, T, as_messages, score_args
from scorers.batcher import MicroBatcher
from scorers.full_recompute import batched_logprobs, forward_batch, plan_batches, response_logprobs
from scorers.incremental import EngineStats, IncrementalEngine, ScoreJob
from scorers.kv_cache import CachePool, CacheStats, SessionCache
from scorers.loading import load_causal_lm, pick_device_dtype
from scorers.reading import PromptEncoding, ResponseTokens, common_prefix_len
from scorers.room import fit_response
from scorers.scoring_model import ScoringModel

__all__ = [
    "ImplicitRewardScorer",
    "ImplicitRewardSession",
    "PromptEncoding",
    "ResponseTokens",
    "ScoringModel",
    "batched_logprobs",
    "common_prefix_len",
    "forward_batch",
    "plan_batches",
    "response_logprobs",
]


class ImplicitRewardSession(ScoringSession):
    """Scores responses to one prompt. Prompt rendering happens at open (errors surface early);
    tokenization, caches and forwards live on the scorer's worker thread."""

    def __init__(self, scorer: "ImplicitRewardScorer", messages: list[ChatMessage]) -> None:
        self._scorer = scorer
        self._prompt_texts: tuple[str, str] | None = (
            scorer.tuned.render(messages),
            scorer.untuned.render(messages),
        )
        self._prompts: tuple[PromptEncoding, PromptEncoding] | None = None
        self._cache: SessionCache | None = SessionCache() if scorer.incremental else None

    @property
    def prompt_texts(self) -> tuple[str, str]:
        """The rendered prompt as (tuned, untuned) see it."""
        if self._prompt_texts is None:
            raise RuntimeError("scoring session is closed")
        return self._prompt_texts

    async def score(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        if self._prompt_texts is None:
            raise RuntimeError("scoring session is closed")
        texts, flags = score_args(texts, finished)
        if not texts:
            return []
        if self._cache is not None:
            return await self._scorer._batcher.submit(ScoreJob(self._cache, self._prompt_texts, texts, flags))
        # Taken now, so a job already queued still runs if the scorer closes meanwhile.
        pair = self._scorer._pair()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._scorer._executor, self._score_blocking, pair, texts, flags)

    def keep(self, texts: Sequence[str]) -> None:
        """Only these responses will be extended (the survivors): free every other cache now.

        Optional: without it, a generation's losers are freed when the next generation appears.
        """
        if self._cache is not None and self._prompt_texts is not None:
            self._scorer._on_worker(self._cache.keep, list(texts))

    def _score_blocking(
        self, pair: tuple[ScoringModel, ScoringModel], texts: list[str], finished: list[bool]
    ) -> list[float]:
        """Full recompute, on the worker thread: never call from the event loop."""
        limits = (self._scorer.batch_size, self._scorer.max_batch_tokens)
        with torch.inference_mode():
            prompts = self._encoded_prompts(pair)
            fitted = [fit_response(pair, prompts, t, f) for t, f in zip(texts, finished)]  # scorers.room
            texts, finished = [f.text for f in fitted], [f.finished for f in fitted]
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
        """Idempotent. The caches are freed on the worker, after any forward already running."""
        self._prompt_texts = None
        self._prompts = None
        cache, self._cache = self._cache, None
        if cache is not None:
            cache.closed = True  # a request still queued for this session fails instead of caching again
            self._scorer._on_worker(self._scorer._release, cache)


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
        incremental: bool = True,
        max_cached_tokens: int | None = 65536,
        batch_wait_ms: float = 2.0,
    ) -> None:
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("batch_size and max_batch_tokens must be at least 1")
        self._models: tuple[ScoringModel, ScoringModel] | None = (tuned, untuned)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.incremental = incremental
        # One worker: forwards of all sessions queue on it, so the device runs one at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="w2s-scorer")
        self._pool = CachePool(max_cached_tokens)
        self._engine = IncrementalEngine(
            (tuned, untuned), self._pool, batch_size=batch_size, max_batch_tokens=max_batch_tokens
        )
        self._batcher: MicroBatcher[ScoreJob, list[float]] = MicroBatcher(
            self._engine.run, self._executor, max_items=batch_size, wait_s=batch_wait_ms / 1000.0,
            size=lambda job: len(job.texts),
        )

    @classmethod
    def from_loaded(
        cls,
        tuned: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSpec],
        untuned: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSpec],
        **options: object,
    ) -> "ImplicitRewardScorer":
        """From (model, tokenizer, spec) triples already in memory (tests, notebooks); options as __init__."""
        return cls(ScoringModel.from_spec(*tuned), ScoringModel.from_spec(*untuned), **options)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> "ImplicitRewardScorer":
        """Load both models as the config says (blocking: call before serving, or off the loop)."""
        device, dtype = pick_device_dtype(cfg.device, cfg.dtype)
        attn = cfg.attn_implementation
        tuned = (*load_causal_lm(cfg.tuned, device, dtype, attn_implementation=attn), cfg.tuned)
        weights = ("path", "gguf_file", "revision", "adapter")  # base and base+adapter differ
        if cfg.tuned.model_dump(include=set(weights)) == cfg.untuned.model_dump(include=set(weights)):
            # A prompt-contrast pair: one set of weights, two templates or system prompts.
            untuned = (tuned[0], tuned[1], cfg.untuned)
        else:
            untuned = (*load_causal_lm(cfg.untuned, device, dtype, attn_implementation=attn), cfg.untuned)
        if cfg.expo_alpha is not None:
            from scorers.expo import extrapolate

            extrapolate(tuned[0], untuned[0], cfg.expo_alpha, tuned_tokenizer=tuned[1], untuned_tokenizer=untuned[1])
        return cls.from_loaded(
            tuned, untuned, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens,
            incremental=cfg.incremental, max_cached_tokens=cfg.max_cached_tokens, batch_wait_ms=cfg.batch_wait_ms,
        )

    @property
    def tuned(self) -> ScoringModel:
        return self._pair()[0]

    @property
    def untuned(self) -> ScoringModel:
        return self._pair()[1]

    @property
    def tokens_run(self) -> tuple[int, int]:
        """Real tokens each side has put through its model so far: the work, not the wall time."""
        tuned, untuned = self._engine.pair
        return tuned.tokens_run, untuned.tokens_run

    @property
    def engine_stats(self) -> EngineStats:
        """Forward passes, rows, seam rollbacks and cache hits of the incremental path."""
        return self._engine.stats

    @property
    def forward_calls(self) -> int:
        return self._engine.stats.forward_calls

    @property
    def batch_jobs(self) -> int:
        """Jobs the micro-batcher ran; fewer than score calls means calls shared forward passes."""
        return self._batcher.jobs

    async def cache_stats(self) -> CacheStats:
        """Cached tokens, segments and sessions, read on the worker after everything queued before."""
        if self._models is not None:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._pool.stats)
        return self._pool.stats()

    def _pair(self) -> tuple[ScoringModel, ScoringModel]:
        if self._models is None:
            raise RuntimeError("scorer is closed")
        return self._models

    def open(self, prompt: ScorerPrompt) -> ImplicitRewardSession:
        return ImplicitRewardSession(self, as_messages(prompt))

    def response_room(self, prompt: ScorerPrompt) -> int | None:
        messages = as_messages(prompt)
        rooms = [r for m in self._pair() if (r := m.response_room(m.render(messages))) is not None]
        return min(rooms) if rooms else None

    async def run_tokenizing(self, fn: Callable[[], T]) -> T:
        """On the worker, which tokenizes too: queued behind a running forward, never beside it."""
        self._pair()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _release(self, cache: SessionCache) -> None:
        cache.release()
        self._pool.forget(cache)

    def _on_worker(self, fn, *args: object) -> None:  # type: ignore[no-untyped-def]
        """Cache bookkeeping from the event loop: queued behind running forwards, never concurrent."""
        try:
            self._executor.submit(fn, *args)
        except RuntimeError:  # the worker is gone, so nothing else can touch the cache
            fn(*args)

    async def aclose(self) -> None:
        """Run what is queued (off the loop), stop the worker, free every cache and drop the models."""
        if self._models is None:
            return
        self._models = None
        await self._batcher.drain()
        await asyncio.to_thread(self._executor.shutdown, True)
        self._pool.drop_all()
