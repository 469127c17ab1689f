"""transformers renamed the KV cache argument within v5 (`past_key_values` → `cache`) and warns on
every call under the old name, at our call site, where no filter on the library's module reaches:
`w2s quickstart` printed one into its log. Generation (serve-local, with the shared prompt
prefill of n > 1) and incremental scoring must run without a FutureWarning, and still score as a
full recompute does."""
from __future__ import annotations

import pytest
from tiny_models import TinyModelDirs

from proxy.config import ModelSpec
from proxy.local.backend import CompletionParams
from proxy.local.causal_lm import LocalCausalLM
from scorers.implicit import ImplicitRewardScorer

pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def test_generation_with_a_shared_prefill_warns_nothing(tiny_model_dirs: TinyModelDirs) -> None:
    lm = LocalCausalLM.load(ModelSpec(path=str(tiny_model_dirs.llama_tuned)), "cpu", "float32")
    try:
        choices, prompt_tokens = lm._generate(CompletionParams(model="tiny", prompt="Once upon a time", n=3, max_tokens=5,
                                                               temperature=1.0, seed=1))
    finally:
        lm.close()
    assert len(choices) == 3 and prompt_tokens > 1
    assert lm.batches == 1


async def test_incremental_scoring_warns_nothing_and_equals_full_recompute(llama_pair) -> None:
    inc = ImplicitRewardScorer.from_loaded(*llama_pair)
    full = ImplicitRewardScorer.from_loaded(*llama_pair, incremental=False)
    texts = [" Red leaves drift", " The sea and the wind"]
    try:
        with inc.open("Write a poem.") as si, full.open("Write a poem.") as sf:
            first = await si.score(texts, [False, False])
            again = await si.score([t + " slowly" for t in texts], [False, True])  # reads the cache back
            want = await sf.score(texts, [False, False]), await sf.score([t + " slowly" for t in texts], [False, True])
    finally:
        await inc.aclose()
        await full.aclose()
    assert first == pytest.approx(want[0], abs=1e-4) and again == pytest.approx(want[1], abs=1e-4)
