"""An on-disk cache of upstream answers to seeded requests, so a rerun of a seeded evaluation
pays nothing twice (`upstream.response_cache_dir`, off by default).

Only a request whose every prompt is seeded is cached: an unseeded one asks for fresh samples,
and answering it from disk would change what it means. The key is the whole request as far as
it shapes the answer (the upstream config's `answer_shaping`: family, model, how prompts are
rendered and continued, ...; then the conversation, the partial answers, the sampling
parameters and the seeds), hashed; the value is the continuations.

Where the model is asked (`base_url`) is not part of the key: that is where, not what it
answers, so a cache filled through one endpoint serves another that serves the same model (the
AlpacaEval identity treats it alike: a resumed run may move, proxy.alpaca_eval.identity).

A hit bills nothing and makes no call; a miss asks the upstream and writes the answer
atomically (a reader sees a whole entry or none), so runs in parallel may share a cache. An
entry that cannot be read is asked again and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from proxy.config import UpstreamBase, answer_shaping
from proxy.types import Continuation, Conversation, Probe, SampleResult, SamplingParams, Usage
from proxy.upstreams.base import Upstream

log = logging.getLogger("w2s.upstream")


class CachedUpstream(Upstream):
    def __init__(self, inner: Upstream, cfg: UpstreamBase, directory: str | Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._shaping = answer_shaping(cfg)
        self.hits = 0
        self.misses = 0

    @property  # type: ignore[override]
    def max_prompts_per_call(self) -> int:
        return self.inner.max_prompts_per_call

    @property  # type: ignore[override]
    def usage(self) -> Usage:
        return self.inner.usage

    @property  # type: ignore[override]
    def api_calls(self) -> int:
        return self.inner.api_calls

    def key(self, conversation: Conversation, partials: Sequence[str], params: SamplingParams,
            seeds: Sequence[int | None]) -> str:
        request = {"upstream": self._shaping, "messages": list(conversation.messages), "raw": conversation.raw,
                   "partials": list(partials), "params": asdict(params), "seeds": list(seeds)}
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def _read(self, key: str) -> list[Continuation] | None:
        try:
            return [Continuation(**c) for c in json.loads(self._path(key).read_text(encoding="utf-8"))]
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            log.warning("upstream cache entry %s unreadable (%s): asking again", key[:12], type(e).__name__)
            return None

    def _write(self, key: str, continuations: list[Continuation]) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:12]}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump([asdict(c) for c in continuations], f)
        os.replace(tmp, path)

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        return await self.sample_batch(conversation, [partial], params, [params.seed])

    async def sample_batch(self, conversation: Conversation, partials: Sequence[str], params: SamplingParams,
                           seeds: Sequence[int | None] | None = None) -> SampleResult:
        seeds = list(seeds) if seeds is not None else [params.seed] * len(partials)
        if any(s is None for s in seeds):
            return await self.inner.sample_batch(conversation, partials, params, seeds)
        key = self.key(conversation, partials, params, seeds)
        cached = self._read(key)
        if cached is not None and len(cached) == params.n * len(partials):
            self.hits += 1
            return SampleResult(cached, Usage(), 0)
        self.misses += 1
        result = await self.inner.sample_batch(conversation, partials, params, seeds)
        self._write(key, result.continuations)
        return result

    async def probe(self) -> Probe:
        return await self.inner.probe()

    async def aclose(self) -> None:
        await self.inner.aclose()
