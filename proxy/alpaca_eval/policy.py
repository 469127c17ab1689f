"""Failures that can never succeed, and what to do with an instruction that cannot fit the guide.

An item fails one of two ways:

- retryable: the cause lies outside the request (the upstream timed out, dropped, answered 5xx
  or 429, refused a key; the run's budget ran out; a remote scorer was unreachable). Running the
  same command again tries exactly those items and may well succeed. An upstream's 4xx is
  counted here too: the runner cannot tell a request the upstream will always refuse from an
  account it refuses (a key, a quota, a model name), and the key is not part of the run;
- permanent: the request itself cannot be served as configured, whatever is retried: the
  instruction does not fit the guide's context (ScorerContextError, refused before anything is
  paid), a setting too small to answer anything (SettingTooSmall), a prompt that is not one
  (PromptError). Running again gives the same failure; only another setting changes it.

An instruction that does not fit the guide (its prompt alone fills the guide's context, or
leaves no room for `max_new_tokens`) is handled by the run's `--on-too-long` policy:

    fail           (default) a permanent failure, reported as such, naming the policy
    unguided       answered by plain sampling (w = k = 1, not scored), marked in its record
    truncate-left  answered guided, the instruction cut from the left (its end kept) to the
                   longest tail that leaves the guide room for `max_new_tokens`, measured with
                   the guide's own tokenizers (Scorer.response_room); marked in its record

A policy other than `fail` changes the answers of those items, so it is part of the run's
generator name (proxy.alpaca_eval.identity), and each such item's record says which fallback
answered it; a directory refuses to mix fallbacks of two policies.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Literal

from proxy.budget import Budget, BudgetExhausted
from proxy.client import Generated, GuidedClient
from proxy.config import ConfigError, search_with
from proxy.finishing import as_they_finish
from proxy.prompts import PromptError, chat_conversation
from scorers.base import ScorerContextError

OnTooLong = Literal["fail", "unguided", "truncate-left"]
ON_TOO_LONG: tuple[OnTooLong, ...] = ("fail", "unguided", "truncate-left")


def is_too_long(error: BaseException | None) -> bool:
    """The item's prompt, or the answer asked for, cannot fit the guide's context."""
    return isinstance(error, ScorerContextError)


def is_permanent(error: BaseException | None) -> bool:
    """Running again with the same settings gives the same failure (see the module's doc)."""
    return isinstance(error, (ScorerContextError, ConfigError, PromptError))


def describe(error: BaseException | None, policy: OnTooLong) -> str:
    """The error as the record and the summary show it; a too-long item names the policy and the
    ways out."""
    if error is None:
        return "no result"
    text = f"{type(error).__name__}: {error}"
    if is_too_long(error):
        if policy == "fail":
            return (f"{text} [the instruction does not fit the guide's context; --on-too-long fail: "
                    "--on-too-long unguided or truncate-left answers it]")
        return f"{text} [--on-too-long {policy} could not answer it]"
    return text


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def cut_left(client: GuidedClient, instruction: str) -> str | None:
    """The longest tail of `instruction` (by bisection over the characters cut) after which the
    guide has room for the run's `max_new_tokens` and its end of text, as `check_room` counts it;
    None when even the empty instruction leaves no such room, or the guide says nothing of its
    room. Tokenizes with the guide's tokenizers, off the event loop (Scorer.run_tokenizing)."""
    scorer, max_new = client.scorer, client.config.search.max_new_tokens
    if scorer is None:
        return None

    def fits(text: str) -> bool:
        room = scorer.response_room(chat_conversation(_messages(text)).scorer_prompt)
        return room is not None and room >= 2 and max_new <= room - 1

    def search() -> str | None:
        if scorer.response_room(chat_conversation(_messages(instruction)).scorer_prompt) is None:
            return None
        if not fits(""):
            return None
        lo, hi = 0, len(instruction)  # instruction[lo:] does not fit (it was refused); [hi:] does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(instruction[mid:]):
                hi = mid
            else:
                lo = mid
        return instruction[hi:]

    return await scorer.run_tokenizing(search)


async def _one(client: GuidedClient, index: int, instruction: str, policy: OnTooLong,
               budget: Budget | None) -> tuple[Generated, int]:
    """(the outcome, how many characters were cut from the instruction's start)."""
    engine = client.engine
    try:
        if policy == "unguided":
            plain = search_with(client.config.search, w=1, k=1)
            result = await engine.search(chat_conversation(_messages(instruction)), plain, score_plain=False,
                                         budget=budget)
            return Generated(index, instruction, result), 0
        cut = await cut_left(client, instruction)
        if cut is None:
            raise ScorerContextError("max_tokens", "no tail of the instruction leaves the guide room for "
                                     f"max_new_tokens {client.config.search.max_new_tokens}")
        result = await engine.search(chat_conversation(_messages(cut)), client.config.search, budget=budget)
        return Generated(index, instruction, result), len(instruction) - len(cut)
    except Exception as e:  # noqa: BLE001 - reported per item, never dropped
        return Generated(index, instruction, error=e), 0


async def answer_too_long(client: GuidedClient, items: Sequence[tuple[int, str]], policy: OnTooLong, *,
                          concurrency: int, budget: Budget | None) -> AsyncIterator[tuple[Generated, int]]:
    """Answer items refused as too long by `policy` (not `fail`), `concurrency` at a time, as they
    finish: (outcome whose `index` is the item's, characters cut)."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(index: int, instruction: str) -> tuple[Generated, int]:
        async with gate:
            if budget is not None and budget.exhausted:
                return Generated(index, instruction, error=BudgetExhausted("the budget was spent before this "
                                                                           "item started")), 0
            return await _one(client, index, instruction, policy, budget)

    async for done in as_they_finish(gated(i, text) for i, text in items):
        yield done
