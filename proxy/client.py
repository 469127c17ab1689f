"""GuidedClient: weak-to-strong search from user code, in three lines.

    async with GuidedClient.from_config("configs/paper-cbs-w4k4l30.yaml") as client:
        result = await client.chat([{"role": "user", "content": "Write a haiku about rain."}])
        print(result.text)

A thin adapter over proxy.engine.Engine, which owns the upstream (its connection pool, retry
policy and concurrency limit) and the scorer (its models and worker thread) and shares them
across every call; this class adds prompt rendering, per-call overrides and `generate_many`.
Several clients (or a client and a server) can share one engine: `GuidedClient(cfg, engine=e)`.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.budget import Budget, BudgetExhausted
from proxy.config import AppConfig, ConfigError, search_with
from proxy.engine import Engine, ResultSummary, Spend
from proxy.finishing import as_they_finish
from proxy.presets import load_config
from proxy.prompts import chat_conversation
from proxy.search import SearchResult, StepCallback, require_scorer
from proxy.types import ChatMessage, Conversation
from proxy.upstreams.base import Upstream
from scorers.base import Scorer


@dataclass
class Generated:
    """One item of `generate_many`: a result or the error that ended it, never neither."""

    index: int
    prompt: str | Sequence[ChatMessage]
    result: SearchResult | None = None
    error: BaseException | None = None


class GuidedClient:
    def __init__(self, config: AppConfig, *, upstream: Upstream | None = None, scorer: Scorer | None = None,
                 engine: Engine | None = None) -> None:
        """`upstream` / `scorer` handed in are used as they are and not closed; an `engine` handed
        in is started if need be and left open (its owner closes it). `config.search` is the
        default search of every call."""
        if engine is not None and (upstream is not None or scorer is not None):
            raise ValueError("GuidedClient: pass an engine, or an upstream and/or a scorer, not both")
        self.config = config
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else Engine(config, upstream=upstream, scorer=scorer)

    @classmethod
    def from_config(cls, path: str | Path, **search_overrides: Any) -> "GuidedClient":
        return cls(load_config(path, **search_overrides))

    def _require_open(self) -> None:
        if not self.engine.started:
            raise RuntimeError("GuidedClient is not open: use `async with GuidedClient(...) as client`")

    @property
    def upstream(self) -> Upstream:
        self._require_open()
        return self.engine.upstream

    @property
    def scorer(self) -> Scorer | None:
        return self.engine.scorer

    @property
    def usage(self) -> Spend:
        """What the upstream was billed so far (failed searches included)."""
        return self.engine.usage

    def summarize(self, result: SearchResult) -> ResultSummary:
        return self.engine.summarize(result)

    async def __aenter__(self) -> "GuidedClient":
        require_scorer(self.config.search, self.engine.guided)
        await self.engine.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_engine:
            await self.engine.aclose()

    async def _search(self, conversation: Conversation, on_step: StepCallback | None, budget: Budget | None,
                      overrides: dict[str, Any]) -> SearchResult:
        self._require_open()
        cfg = search_with(self.config.search, **overrides)
        return await self.engine.search(conversation, cfg, on_step=on_step, budget=budget)

    async def complete(self, prompt: str, *, on_step: StepCallback | None = None, budget: Budget | None = None,
                       **overrides: Any) -> SearchResult:
        """Continue a raw completion prompt; the scorer sees the prompt as one user turn.
        `budget` (proxy.budget): a cap shared with other searches, e.g. a whole run's."""
        return await self._search(Conversation.completion(prompt), on_step, budget, overrides)

    async def chat(self, messages: Sequence[ChatMessage], *, on_step: StepCallback | None = None,
                   budget: Budget | None = None, **overrides: Any) -> SearchResult:
        """Answer the last user turn; PromptError (a ValueError) naming the field when the
        messages cannot be answered."""
        return await self._search(chat_conversation(messages), on_step, budget, overrides)

    async def instruct(self, instruction: str, **overrides: Any) -> SearchResult:
        """Answer one instruction (the AlpacaEval setting)."""
        return await self.chat([{"role": "user", "content": instruction}], **overrides)

    async def generate_many(self, prompts: Iterable[str | Sequence[ChatMessage]], *, concurrency: int = 8,
                            budget: Budget | None = None, **overrides: Any) -> AsyncIterator[Generated]:
        """Answers as they finish (not in input order); a failed item carries its error.

        A string is an instruction; a list is chat messages. At most `concurrency` searches
        run at once; leaving the loop early cancels the rest. With a shared `budget`, an item
        that would start after it is spent fails with BudgetExhausted instead.
        """
        if concurrency < 1:
            raise ConfigError("concurrency: must be at least 1")
        search_with(self.config.search, **overrides)  # refuse bad overrides before starting
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, p: str | Sequence[ChatMessage]) -> Generated:
            async with gate:
                try:
                    if budget is not None and budget.exhausted:
                        raise BudgetExhausted("the budget was spent before this item started")
                    if isinstance(p, str):
                        return Generated(i, p, await self.instruct(p, budget=budget, **overrides))
                    return Generated(i, p, await self.chat(p, budget=budget, **overrides))
                except Exception as e:  # noqa: BLE001 - reported per item, never dropped
                    return Generated(i, p, error=e)

        async for done in as_they_finish(one(i, p) for i, p in enumerate(prompts)):
            yield done
