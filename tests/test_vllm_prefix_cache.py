"""Prefix caching on the real engine: a CBS search through the project, against vLLM's CPU build
(tests/vllm_engine.py serves it with automatic prefix caching and `--enable-prompt-tokens-details`,
KV blocks of BLOCK_SIZE = 128 tokens), finds the re-sent prefix in its usage's `cached_tokens`.

vLLM caches whole blocks and reads at most the whole blocks of a prompt before its last token:
a request whose prompt has P tokens can be served `full(P) = (P - 1) // 128 * 128` tokens from
the cache, once an earlier request (or a sibling sample of the same request) filled them. So a
prompt must be longer than one block before anything is cached, and what each step of a search
re-sends past the last full block (the rest of the prompt and the answer so far) is computed
again. The numbers below are exact where that arithmetic makes them so.

What vLLM reports per request: one sample's count (a request of n samples bills its prompt
once, and its samples after the first read the first one's blocks), and for a list of prompts
in one completions request the count of one prompt only (`last_final_res` in vLLM 0.32.0's
completions server), though the request bills every prompt.
"""
from __future__ import annotations

import uuid

import pytest

from proxy.config import SearchConfig
from proxy.search import search
from proxy.search.trace import SearchResult
from proxy.types import Conversation
from tests.doubles import FnScorer
from tests.test_vllm_engine import make
from tests.vllm_engine import BLOCK_SIZE, VllmServer

pytestmark = pytest.mark.slow

CFG = SearchConfig(w=2, k=2, l=8, max_new_tokens=16, temperature=1.0, seed=7)
"""Two steps of 8 tokens: the second re-sends the prompt and an answer of 8 tokens."""


def full(prompt_tokens: int) -> int:
    """The most prompt tokens vLLM can read from its cache for a prompt of this length."""
    return (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE


def long_question() -> Conversation:
    """About 340 tokens (two full blocks and most of a third), different in its first block on
    every call so that nothing from an earlier test or run is in the cache."""
    notes = " ".join(f"Note {i}: the keeper climbed the stairs at dusk and lit the lamp." for i in range(17))
    return Conversation.instruction(f"Request {uuid.uuid4().hex[:8]}. Summarize these notes about a lighthouse. {notes}")


def short_question() -> Conversation:
    return Conversation.instruction(f"Request {uuid.uuid4().hex[:8]}. Write one sentence about the sea.")


async def run(server: VllmServer, kind: str, question: Conversation, **upstream: object) -> SearchResult:
    async with make(server, kind, **upstream) as up:
        result = await search(question, up, FnScorer(lambda text, finished: float(len(text))), CFG)
    assert up.usage == result.usage
    return result


# (family, upstream settings, requests per beam reported): the chat family sends one request per
# beam; the completions family sends a step's beams as one list of prompts, whose cached count
# vLLM reports for one prompt only, unless lists are turned off.
SHAPES = [("openai-chat", {}, True), ("openai-completions", {"supports_prompt_lists": False}, True),
          ("openai-completions", {}, False)]


@pytest.mark.parametrize(("kind", "upstream", "per_beam"), SHAPES, ids=["chat", "completions", "completions-lists"])
async def test_a_long_prompt_is_read_from_the_cache_after_the_first_step(
        vllm_server: VllmServer, kind: str, upstream: dict, per_beam: bool) -> None:
    result = await run(vllm_server, kind, long_question(), **upstream)
    first, *later = result.steps
    prompt = first.usage.prompt_tokens  # the first step: one request, the prompt billed once
    assert first.calls == 1
    assert 2 * BLOCK_SIZE < prompt and full(prompt + CFG.max_new_tokens) == full(prompt) == 2 * BLOCK_SIZE, \
        f"a {prompt}-token prompt does not give the arithmetic below (blocks of {BLOCK_SIZE})"
    # A fresh prompt: its first sample computes the blocks, its second may read them (vLLM
    # reports one of the two).
    assert first.usage.cached_tokens in (0, full(prompt))
    assert later, "the search ended after its first step"
    for step in later:
        # Every request re-sends the prompt's two full blocks, which the first step filled; the
        # answer so far (under max_new_tokens tokens) fills no block of its own.
        reported = len(step.expanded) if per_beam else 1
        assert step.calls == (len(step.expanded) if per_beam else 1)
        assert step.usage.cached_tokens == reported * full(prompt)
        assert step.usage.prompt_tokens >= len(step.expanded) * prompt
    assert result.usage.cached_tokens == sum(s.usage.cached_tokens for s in result.steps) > 0
    assert result.usage.cached_tokens >= len(later) * full(prompt)


async def test_a_prompt_shorter_than_a_block_is_never_read_from_the_cache(vllm_server: VllmServer) -> None:
    """What a chat prompt of a sentence gets (SmolLM2's template adds its system turn: about 40
    tokens): nothing, at any step, while the prompt and the answer so far fit in one block."""
    result = await run(vllm_server, "openai-chat", short_question())
    first = result.steps[0]
    assert len(result.steps) > 1 and first.calls == 1
    # The longest prompt the search sent (the prompt and all but the last chunk) is still no
    # longer than one block.
    assert first.usage.prompt_tokens + CFG.max_new_tokens <= BLOCK_SIZE
    assert [s.usage.cached_tokens for s in result.steps] == [0] * len(result.steps)
    assert result.usage.cached_tokens == 0 and result.usage.prompt_tokens > 0


async def test_the_billing_rule_predicts_what_vllm_reports(vllm_server: VllmServer) -> None:
    """benchmarks/billing.py prices a search from its recorded tree under each provider's cache
    rule; its vLLM rule (whole blocks of a sequence computed by an earlier step, never the
    prompt's last token), applied to the exact requests a CBS search made, predicts the cached
    tokens the engine reported for them (the first step aside: its samples may read each other's
    blocks, and vLLM reports one of them)."""
    from transformers import AutoTokenizer

    from benchmarks.billing import PriceList, bill, tree_requests
    from proxy.prompts import render

    question = long_question()
    async with make(vllm_server, "openai-completions", supports_prompt_lists=False) as up:
        result = await search(question, up, FnScorer(lambda text, finished: float(len(text))), CFG)
        prompt = render(question, up.cfg)  # type: ignore[arg-type]
    tok = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    rule = PriceList("vllm", "vllm-completions", "vllm", "vLLM automatic prefix caching", block_size=BLOCK_SIZE)
    tree = [[c.parent, c.step, c.chunk] for c in sorted(result.nodes.values(), key=lambda c: c.id)]
    predicted = bill(prompt, tree_requests(tree), rule, lambda t: tok(t, add_special_tokens=False)["input_ids"])
    first, *later = result.steps
    assert later and predicted.requests == result.calls
    assert predicted.prompt_total == result.usage.prompt_tokens
    assert predicted.cached == sum(s.usage.cached_tokens for s in later) > 0
