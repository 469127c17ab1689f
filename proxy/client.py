"""GuidedClient: weak-to-strong search from user code, in three lines.

    async with GuidedClient.from_config("configs/paper-cbs-w4k4l30.yaml") as client:
        result = await client.chat([{"role": "user", "content": "Write a haiku about rain."}])
        print(result.text)

The client owns one upstream (its connection pool, retry policy and concurrency limit) and one
scorer (its models and worker thread) and shares them across every call.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import AppConfig, ConfigError, require_scorer, search_with
from proxy.presets import load_config
from proxy.prompts import render_chat
from proxy.search import SearchResult, StepCallback, search
from proxy.upstreams.base import Upstream
from proxy.upstreams.registry import make_upstream
from scorers.base import ChatMessage, Scorer


@dataclass
class Generated:
    """One item of `generate_many`: a result or the error that ended it, never neither."""

    index: int
    prompt: str | Sequence[ChatMessage]
    result: SearchResult | None = None
    error: BaseException | None = None


class GuidedClient:
    def __init__(self, config: AppConfig, *, upstream: Upstream | None = None, scorer: Scorer | None = None) -> None:
        self.config = config
        self._upstream = upstream
        self._scorer = scorer
        self._owns_upstream = upstream is None
        self._owns_scorer = scorer is None

    @classmethod
    def from_config(cls, path: str | Path, **search_overrides: Any) -> "GuidedClient":
        return cls(load_config(path, **search_overrides))

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            raise RuntimeError("GuidedClient is not open: use `async with GuidedClient(...) as client`")
        return self._upstream

    @property
    def scorer(self) -> Scorer | None:
        return self._scorer

    async def __aenter__(self) -> "GuidedClient":
        require_scorer(self.config.search, self._scorer is not None or self.config.scorer is not None)
        if self._upstream is None:
            self._upstream = make_upstream(self.config.upstream)
        if self._scorer is None and self.config.scorer is not None:
            from scorers.registry import load_scorer

            self._scorer = await asyncio.to_thread(load_scorer, self.config.scorer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_upstream and self._upstream is not None:
            await self._upstream.aclose()
            self._upstream = None
        if self._owns_scorer and self._scorer is not None:
            await self._scorer.aclose()
            self._scorer = None

    async def complete(self, prompt: str, *, on_step: StepCallback | None = None, **overrides: Any) -> SearchResult:
        """Continue a raw completion prompt; the scorer sees the prompt as one user turn."""
        cfg = search_with(self.config.search, **overrides)
        return await search(prompt, self.upstream, self.scorer, cfg, on_step=on_step)

    async def chat(self, messages: Sequence[ChatMessage], *, on_step: StepCallback | None = None,
                   **overrides: Any) -> SearchResult:
        """Answer the last user turn; the upstream sees the messages rendered by its template."""
        cfg = search_with(self.config.search, **overrides)
        prompt = render_chat(messages, self.config.upstream)
        return await search(prompt, self.upstream, self.scorer, cfg, scorer_prompt=list(messages), on_step=on_step)

    async def instruct(self, instruction: str, **overrides: Any) -> SearchResult:
        """Answer one instruction (the AlpacaEval setting)."""
        return await self.chat([{"role": "user", "content": instruction}], **overrides)

    async def generate_many(self, prompts: Iterable[str | Sequence[ChatMessage]], *, concurrency: int = 8,
                            **overrides: Any) -> AsyncIterator[Generated]:
        """Answers as they finish (not in input order); a failed item carries its error.

        A string is an instruction; a list is chat messages. At most `concurrency` searches
        run at once; leaving the loop early cancels the rest.
        """
        if concurrency < 1:
            raise ConfigError("concurrency: must be at least 1")
        search_with(self.config.search, **overrides)  # refuse bad overrides before starting
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, p: str | Sequence[ChatMessage]) -> Generated:
            async with gate:
                try:
                    if isinstance(p, str):
                        return Generated(i, p, await self.instruct(p, **overrides))
                    return Generated(i, p, await self.chat(p, **overrides))
                except Exception as e:  # noqa: BLE001 - reported per item, never dropped
                    return Generated(i, p, error=e)

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
        try:
            for fut in asyncio.as_completed(tasks):
                yield await fut
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
