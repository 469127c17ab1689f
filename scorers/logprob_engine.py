"""Prompt log-probabilities from an OpenAI-compatible engine serving one model, on one or more
replicas: the remote scorer's only contact with the weights.

The request is vLLM's: POST /v1/completions with the sequence as token ids, `prompt_logprobs: 0`
(each prompt token's own log-probability, keyed by its id), `max_tokens: 1` and temperature 0.
Token ids, not text: the tokenizer here decides the tokens, so the prompt/response boundary and
the EOS term follow the local scorer's rules (scorers.reading) and the engine cannot re-cut a
seam. `max_tokens: 1` because vLLM 0.32.0 refuses 0 ("max_tokens must be at least 1") unless
`echo` is set, and echo's log-probabilities are keyed by token text, which is ambiguous. Every
answer is checked against the ids that were sent; an answer that does not fit them is retried
like a 5xx (another replica first), never summed.

What the engine's prefix cache does for it (measured on vLLM 0.32.0's CPU build): nothing. A
request that asks for prompt log-probabilities skips the prefix cache altogether (its
`prefix_cache_queries_total` does not move), because every position's logits are needed, so
each call computes its whole sequence, the paper code's full recompute. benchmarks/remote_scorer.py
measures what that costs against the local incremental scorer.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx2
import openai
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.config import EngineEndpoint, engine_api_key
from proxy.upstreams.errors import UpstreamError, malformed
from proxy.upstreams.openai_http import openai_errors, sdk_client
from proxy.upstreams.retry import failure_kind, retries_reported_to, retrying
from scorers.base import ScorerFailure


class EngineUnsuitable(ScorerFailure):
    """An engine that cannot serve this scorer: unreachable at start, or not serving the model."""


class _TokenLogprob(BaseModel):
    model_config = ConfigDict(extra="ignore")
    logprob: float


class _Choice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    index: int
    prompt_logprobs: list[dict[str, _TokenLogprob] | None] | None = None


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    choices: list[_Choice]


@dataclass(eq=False)
class Replica:
    base_url: str
    client: openai.AsyncOpenAI
    limit: asyncio.Semaphore
    in_flight: int = 0
    failures: int = 0
    """Failures in a row: a replica that keeps failing is asked last."""


def read_logprobs(raw: httpx2.Response, seqs: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per sequence, the log-probability of each token after the first, from a 200's body; or
    `malformed` when the answer does not fit the ids that were sent."""
    try:
        answer = _Answer.model_validate_json(raw.content)
    except ValidationError as e:
        raise malformed(e.errors()[0]["msg"]) from None
    if len(answer.choices) != len(seqs):
        raise malformed(f"{len(answer.choices)} choices for {len(seqs)} prompts")
    out: list[list[float]] = []
    for choice, ids in zip(sorted(answer.choices, key=lambda c: c.index), seqs):
        rows = choice.prompt_logprobs
        if rows is None or len(rows) != len(ids):
            got = "no prompt_logprobs" if rows is None else f"{len(rows)} prompt_logprobs"
            raise malformed(f"{got} for a prompt of {len(ids)} tokens")
        values = []
        for pos in range(1, len(ids)):
            entry = (rows[pos] or {}).get(str(ids[pos]))
            if entry is None or math.isnan(entry.logprob):
                raise malformed(f"no log-probability for token {ids[pos]} at position {pos}")
            values.append(entry.logprob)
        out.append(values)
    return out


@dataclass(eq=False)
class LogprobEngine:
    """One model on its replicas. Requests go to the replica with the fewest in flight (then the
    fewest recent failures); a failed try moves to the next one under the one retry policy."""

    endpoint: EngineEndpoint
    model: str
    replicas: list[Replica] = field(init=False)
    retries: int = field(default=0, init=False)
    """Tries after a failed one, over the engine's life (tests and operators read it)."""

    def __post_init__(self) -> None:
        key = engine_api_key(self.endpoint).get_secret_value()
        self.replicas = [Replica(url, sdk_client(url, key, self.endpoint.timeout_s),
                                 asyncio.Semaphore(self.endpoint.max_concurrency)) for url in self.endpoint.base_url]

    def _pick(self) -> Replica:
        return min(self.replicas, key=lambda r: (r.failures, r.in_flight))

    async def check(self) -> int | None:
        """Every replica lists the model (GET /models, once, no retries); the smallest
        `max_model_len` they report (vLLM does), or None when none says."""
        lengths: list[int] = []
        for r in self.replicas:
            try:
                page = await r.client.with_options(timeout=min(10.0, self.endpoint.timeout_s)).models.list()
            except openai.APIError as e:
                raise EngineUnsuitable(f"scorer engine {r.base_url}: {type(e).__name__} on GET /models") from None
            served = {m.id: m for m in page.data}
            if self.model not in served:
                names = ", ".join(sorted(served)) or "nothing"
                raise EngineUnsuitable(f"scorer engine {r.base_url} does not serve {self.model!r} (it serves {names})")
            length = (served[self.model].model_extra or {}).get("max_model_len")
            if isinstance(length, int):
                lengths.append(length)
        return min(lengths) if lengths else None

    async def logprobs(self, seqs: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(ids[i] | ids[:i]) for i >= 1, per sequence, in one request (the caller splits)."""
        body = {"model": self.model, "prompt": [list(s) for s in seqs], "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0}
        try:
            # Retries counted here, not reported to whoever counts the upstream's (the server's metrics).
            with retries_reported_to(self._retried):
                async for attempt in retrying(self.endpoint.max_attempts, 0.2, 5.0):
                    with attempt:
                        values = await self._try(body, seqs)
        except UpstreamError as e:
            raise ScorerFailure(f"the scorer's engine for {self.model!r} failed after {self.endpoint.max_attempts} "
                                f"tries ({failure_kind(e)})") from e
        return values

    async def _try(self, body: dict, seqs: Sequence[Sequence[int]]) -> list[list[float]]:
        replica = self._pick()
        replica.in_flight += 1
        try:
            async with replica.limit:
                with openai_errors():  # ours, which the retry policy reads
                    raw = await replica.client.post("/completions", body=body, cast_to=httpx2.Response)
            values = read_logprobs(raw, seqs)
        except Exception:
            replica.failures += 1
            raise
        finally:
            replica.in_flight -= 1
        replica.failures = 0
        return values

    def _retried(self, exc: BaseException) -> None:
        self.retries += 1

    async def aclose(self) -> None:
        for r in self.replicas:
            await r.client.close()
