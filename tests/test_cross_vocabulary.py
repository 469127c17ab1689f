"""Guidance across vocabularies: the black box and the guide share no tokenizer.

The black box here is a real transformers model (tiny GPT-2, tokenizer B: 300 byte-level BPE
tokens that merge across word boundaries) served over HTTP by the local completions server and
reached through the OpenAI upstream, so chunks end wherever *its* tokens end. The guide is a
Llama pair on tokenizer A. Every candidate the search scored must carry exactly the score an
independent slow computation gives its whole text, whatever seams the black box's chunks cut.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from test_implicit_scorer import slow_score
from tiny_models import Loaded, TinyModelDirs

from proxy.config import ModelSpec, OpenAICompletionsConfig, SearchConfig
from proxy.local.server import LocalCompletionsServer
from proxy.search import search
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from scorers.implicit import ImplicitRewardScorer
from proxy.local.causal_lm import LocalCausalLM

INSTRUCTION = "Tell me about the small fox and the river."


@pytest.fixture
async def gpt2_black_box(tiny_model_dirs: TinyModelDirs) -> AsyncIterator[OpenAICompletionsUpstream]:
    lm = LocalCausalLM.load(ModelSpec(path=str(tiny_model_dirs.gpt2)), "cpu", "float32")
    async with LocalCompletionsServer(lm, model="tiny-gpt2") as server:
        cfg = OpenAICompletionsConfig(model="tiny-gpt2", base_url=server.base_url, prompt_template="{instruction}",
                                      timeout_s=30.0)
        async with OpenAICompletionsUpstream(cfg) as upstream:
            yield upstream
    lm.close()


@pytest.mark.parametrize("incremental", [True, False])
async def test_every_candidate_scores_as_a_direct_computation(
        gpt2_black_box: OpenAICompletionsUpstream, llama_pair: tuple[Loaded, Loaded], incremental: bool) -> None:
    tuned, untuned = llama_pair
    gpt2_vocab = 300
    assert len(tuned[1]) != gpt2_vocab  # the guide's vocabulary is not the black box's
    scorer = ImplicitRewardScorer.from_loaded(tuned, untuned, incremental=incremental)
    cfg = SearchConfig(w=2, k=2, l=3, max_new_tokens=9, temperature=1.0, seed=7)
    r = await search(INSTRUCTION, gpt2_black_box, scorer, cfg)  # a raw prompt: the guides read it as a user turn
    with scorer.open(INSTRUCTION) as session:
        prompts = session.prompt_texts
    nodes = [c for c in r.nodes.values() if c.id != 0]
    assert len(nodes) >= 8 and len({c.text for c in nodes}) >= 4  # several steps, distinct candidates
    for c in nodes:
        want = slow_score(tuned, untuned, prompts, c.text, c.finished)
        assert c.score == pytest.approx(want, abs=1e-4), c.text
    # the answer is exactly the black box's chunks, concatenated in order
    assert r.text == "".join(r.nodes[i].chunk for i in r.path)
    await scorer.aclose()
