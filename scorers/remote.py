"""The paper's score, log p_tuned(response) - log p_untuned(response), with each model behind an
engine (vLLM, or any OpenAI-compatible server that returns prompt log-probabilities).

Why: the pair then runs where users already run models (one GPU per model, replicas behind
one name), and a `w2s serve` process holds nothing but tokenizers, so any number of them can
serve the same traffic. What stays here is everything that decides *which* tokens are scored:
each side's chat template, its tokenizer (loaded from `path` without weights), the
prompt/response boundary on the token level and the EOS term, all scorers.reading's, the rules
the local scorer follows. The engine only returns per-token log-probabilities of the ids it is
sent (scorers.logprob_engine), so on the same weights in the same precision both scorers give
the same numbers (tests/test_remote_scorer.py checks it against a real vLLM in float32).

What it does not do: reuse work between steps. The local scorer keeps each beam's KV cache;
an engine asked for prompt log-probabilities recomputes the whole sequence at every call (see
scorers.logprob_engine), so a search costs the engine the full-recompute token count.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from transformers import AutoConfig, AutoTokenizer

from proxy.config import ModelSpec, ScorerConfig
from proxy.config.scorer import check_local_model
from scorers.base import ChatMessage, Scorer, ScorerPrompt, ScoringSession, T, as_messages, score_args
from scorers.batch_plan import plan_batches
from scorers.logprob_engine import LogprobEngine
from scorers.reading import ModelReading, PromptEncoding, ResponseTokens
from scorers.room import fit_response, with_eos
from scorers.templates import resolve_template


def load_reading(spec: ModelSpec) -> ModelReading:
    """The tokenizer and chat template of `spec` (no weights), its positions from its config."""
    kwargs = {k: v for k, v in (("gguf_file", spec.gguf_file), ("revision", spec.revision)) if v}
    check_local_model(spec.path)  # a missing local path said so, not as a malformed hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path, **kwargs)
    except Exception as e:  # chained; the message names which model it was
        raise ValueError(f"cannot load the tokenizer of scorer model {spec.path}: {e}") from e
    try:
        config = AutoConfig.from_pretrained(spec.path, **kwargs)
        max_len = getattr(config, "max_position_embeddings", None)
    except Exception:  # the engine's own limit is read at start anyway
        max_len = None
    return ModelReading(tokenizer=tokenizer, chat_template=resolve_template(spec.chat_template),
                        system_prompt=spec.system_prompt, name=spec.path,
                        max_len=max_len if isinstance(max_len, int) else None)


class RemoteSession(ScoringSession):
    """Scores responses to one prompt: rendered at open (errors surface early), tokenized on the
    scorer's tokenizer thread, summed from the engines' answers."""

    def __init__(self, scorer: "RemoteScorer", messages: list[ChatMessage]) -> None:
        self._scorer = scorer
        self._texts: tuple[str, str] | None = tuple(side.render(messages) for side in scorer.sides)  # type: ignore[assignment]
        self._prompts: tuple[PromptEncoding, ...] | None = None

    async def score(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        if self._texts is None:
            raise RuntimeError("scoring session is closed")
        texts, flags = score_args(texts, finished)
        if not texts:
            return []
        scorer = self._scorer
        loop = asyncio.get_running_loop()
        seqs = await loop.run_in_executor(scorer.tokenizer_thread, self._encode, texts, flags)
        tuned, untuned = await asyncio.gather(scorer.sums(0, seqs[0]), scorer.sums(1, seqs[1]))
        return [t - u for t, u in zip(tuned, untuned)]

    def _encode(self, texts: list[str], finished: list[bool]) -> list[list[ResponseTokens]]:
        """Per side, prompt + response ids of every text (on the tokenizer thread)."""
        if self._texts is None:
            raise RuntimeError("scoring session is closed")
        sides = self._scorer.sides
        if self._prompts is None:
            self._prompts = tuple(side.encode_prompt(t) for side, t in zip(sides, self._texts))
        fitted = [fit_response(sides, self._prompts, t, f) for t, f in zip(texts, finished)]  # scorers.room
        return [[with_eos(side, f.seqs[i]) if f.finished else f.seqs[i] for f in fitted]
                for i, side in enumerate(sides)]

    def close(self) -> None:
        self._texts = None
        self._prompts = None


class RemoteScorer(Scorer):
    """Weak-to-strong guidance score with the pair served by engines."""

    name = "remote"

    def __init__(self, tuned: ModelReading, untuned: ModelReading, engines: tuple[LogprobEngine, LogprobEngine],
                 *, batch_size: int = 8, max_batch_tokens: int = 16384) -> None:
        self.sides = (tuned, untuned)
        self.engines = engines
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="w2s-tokenize")
        self._closed = False
        self._tokens = [0, 0]

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> "RemoteScorer":
        """Tokenizers from the specs' paths (blocking: call off the loop); engines, not yet asked
        anything (`start` does). A prompt-contrast pair on one engine shares its client."""
        tuned = load_reading(cfg.tuned)
        same_files = cfg.tuned.model_dump(include={"path", "gguf_file", "revision"}) == \
            cfg.untuned.model_dump(include={"path", "gguf_file", "revision"})
        untuned = load_reading(cfg.untuned) if not same_files else ModelReading(
            tokenizer=tuned.tokenizer, chat_template=resolve_template(cfg.untuned.chat_template),
            system_prompt=cfg.untuned.system_prompt, name=cfg.untuned.path, max_len=tuned.max_len)
        engines = []
        for spec in (cfg.tuned, cfg.untuned):
            assert spec.engine is not None  # ScorerConfig refuses a remote side without one
            model = spec.engine.model or spec.path
            shared = next((e for e in engines if e.endpoint == spec.engine and e.model == model), None)
            engines.append(shared or LogprobEngine(spec.engine, model))
        return cls(tuned, untuned, (engines[0], engines[1]), batch_size=cfg.batch_size,
                   max_batch_tokens=cfg.max_batch_tokens)

    async def start(self) -> None:
        """Ask every replica whether it serves its model, and take the engines' context length:
        a sequence may use all of it but the one token the engine must generate."""
        for side, engine in zip(self.sides, self.engines):
            engine_len = await engine.check()
            if engine_len is not None:
                side.max_len = min(side.max_len or engine_len, engine_len - 1)

    async def sums(self, side: int, seqs: list[ResponseTokens]) -> list[float]:
        """Each sequence's summed response log-probability on side 0 (tuned) or 1 (untuned);
        requests of up to `batch_size` sequences go to its engine at once. Nothing to score (an
        empty unfinished response) is 0.0 without a request."""
        if self._closed:
            raise RuntimeError("scorer is closed")
        engine = self.engines[side]
        out = [0.0] * len(seqs)
        todo = [i for i, s in enumerate(seqs) if s.n_scored > 0]
        batches = [[todo[j] for j in b] for b in
                   plan_batches([len(seqs[i].ids) for i in todo], self.batch_size, self.max_batch_tokens)]
        answers = await asyncio.gather(*(engine.logprobs([seqs[i].ids for i in b]) for b in batches))
        self._tokens[side] += sum(len(seqs[i].ids) for i in todo)
        for batch, values in zip(batches, answers):
            for i, per_token in zip(batch, values):
                out[i] = sum(per_token[seqs[i].boundary - 1:])
        return out

    @property
    def tokens_sent(self) -> tuple[int, int]:
        """Tokens each side's engine was asked to compute (whole sequences, every call)."""
        return self._tokens[0], self._tokens[1]

    def open(self, prompt: ScorerPrompt) -> RemoteSession:
        if self._closed:
            raise RuntimeError("scorer is closed")
        return RemoteSession(self, as_messages(prompt))

    def response_room(self, prompt: ScorerPrompt) -> int | None:
        messages = as_messages(prompt)
        rooms = [r for side in self.sides if (r := side.response_room(side.render(messages))) is not None]
        return min(rooms) if rooms else None

    async def run_tokenizing(self, fn: Callable[[], T]) -> T:
        """On the tokenizer thread, where the sessions tokenize."""
        if self._closed:
            raise RuntimeError("scorer is closed")
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for engine in {id(e): e for e in self.engines}.values():
            await engine.aclose()
        await asyncio.to_thread(self.tokenizer_thread.shutdown, True)
