"""An upstream that answers with fewer choices than asked must not change a seeded answer: the
missing samples are asked for alone under the seeds they would have had in a full answer
(proxy.types.choice_seed agrees with proxy.types.sample_seed), so a seeded search against a
server that sometimes answers short is the search against a fault-free one."""
from __future__ import annotations

from collections import Counter

import pytest

from proxy.config import SearchConfig
from proxy.search import search
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.types import SamplingParams
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import upstream_config
from tests.doubles import FnScorer
from tests.test_server import distinct_words


@pytest.mark.parametrize("n", [2, 3, 5])
async def test_a_short_answer_completed_is_the_full_answer(n: int) -> None:
    params = SamplingParams(n=n, max_tokens=8, seed=11)
    async with ToyCompletionsServer(failures=["fewer-choices"]) as faulty, ToyCompletionsServer() as clean:
        async with OpenAICompletionsUpstream(upstream_config(faulty, supports_n=True)) as up:
            got = await up.sample_prompt("The cat", params)
        async with OpenAICompletionsUpstream(upstream_config(clean, supports_n=True)) as ref_up:
            ref = await ref_up.sample_prompt("The cat", params)
    assert faulty.injected == Counter({"fewer-choices": 1})
    assert [q["n"] for q in faulty.requests] == [n, 1]  # the held-back choice was asked for alone
    assert [c.text for c in got.continuations] == [c.text for c in ref.continuations]
    assert [c.finished for c in got.continuations] == [c.finished for c in ref.continuations]


async def test_a_short_answer_to_a_list_of_prompts_is_completed_as_the_full_list() -> None:
    """A list of prompts answered with too few choices is asked again prompt by prompt, each under
    the list's one seed: the samples the whole list would have had."""
    params = SamplingParams(n=3, max_tokens=8)
    prompts, seeds = ["The cat", "A dog", "One bird"], [11, 12, 13]
    lists = dict(supports_n=True, supports_prompt_lists=True)
    async with ToyCompletionsServer(failures=["fewer-choices"]) as faulty, ToyCompletionsServer() as clean:
        async with OpenAICompletionsUpstream(upstream_config(faulty, **lists)) as up:
            got = await up.sample_prompts(prompts, params, seeds)
        async with OpenAICompletionsUpstream(upstream_config(clean, **lists)) as ref_up:
            ref = await ref_up.sample_prompts(prompts, params, seeds)
    assert faulty.injected == Counter({"fewer-choices": 1})
    assert isinstance(faulty.requests[0]["prompt"], list) and len(clean.requests) == 1
    assert [c.text for c in got.continuations] == [c.text for c in ref.continuations]


async def test_n_refused_fans_out_into_the_full_answer() -> None:
    """Where n > 1 is refused, the n=1 requests give the samples a server honouring n gives."""
    params = SamplingParams(n=4, max_tokens=8, seed=5)
    async with ToyCompletionsServer(support_n=False) as refusing, ToyCompletionsServer() as clean:
        async with OpenAICompletionsUpstream(upstream_config(refusing, supports_n=False)) as up:
            got = await up.sample_prompt("A dog", params)
        async with OpenAICompletionsUpstream(upstream_config(clean, supports_n=True)) as ref_up:
            ref = await ref_up.sample_prompt("A dog", params)
    assert [c.text for c in got.continuations] == [c.text for c in ref.continuations]


@pytest.mark.parametrize("lists", [False, True], ids=["one-prompt-a-request", "prompt-lists"])
async def test_seeded_cbs_against_short_answers_equals_the_fault_free_search(lists: bool) -> None:
    cfg_kw = dict(w=2, k=3, l=4, max_new_tokens=16, temperature=1.0)
    prompts = [f"Story {i}: the dog sat on" for i in range(8)]
    async with ToyCompletionsServer(fault_rate=0.5, fault_kinds=["fewer-choices"], fault_seed=3) as faulty, \
            ToyCompletionsServer() as clean:
        # one prompt per request: a short answer is completed by n_choices, sample by sample
        upcfg = dict(supports_n=True, supports_prompt_lists=lists)
        async with OpenAICompletionsUpstream(upstream_config(faulty, **upcfg)) as up, \
                OpenAICompletionsUpstream(upstream_config(clean, **upcfg)) as ref_up:
            for seed, prompt in enumerate(prompts):
                cfg = SearchConfig(**cfg_kw, seed=100 + seed)
                got = await search(prompt, up, FnScorer(distinct_words), cfg)
                ref = await search(prompt, ref_up, FnScorer(distinct_words), cfg)
                assert (got.text, got.score, got.tokens, got.finished) == (ref.text, ref.score, ref.tokens,
                                                                          ref.finished), prompt
                assert [[(c.text, c.score) for c in s.candidates] for s in got.steps] == \
                    [[(c.text, c.score) for c in s.candidates] for s in ref.steps]
    assert faulty.injected["fewer-choices"] >= 5  # the short answers really happened
