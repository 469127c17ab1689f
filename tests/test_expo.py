"""ExPO (theta_tuned + alpha * (theta_tuned - theta_untuned)) applied at load time."""
from __future__ import annotations

import pytest
import torch
from tiny_models import (
    TinyModelDirs,
    build_tiny_model,
    build_tokenizer_a,
    build_tokenizer_b,
    cpu_scorer_config,
)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from proxy.config import ModelSpec
from scorers.expo import extrapolate
from scorers.implicit import ImplicitRewardScorer

TEXTS = ["Red leaves drift and fall", "The sea", "Apples, oranges and pears."]


def _state(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(path)).state_dict().items()}


async def _scores(scorer: ImplicitRewardScorer) -> list[float]:
    with scorer.open("Write a poem.") as session:
        return await session.score(TEXTS, [True, False, True])


@pytest.mark.parametrize("alpha", [0.5, -0.25])
def test_parameters_equal_the_formula(tiny_model_dirs: TinyModelDirs, alpha: float):
    tuned_sd, untuned_sd = _state(tiny_model_dirs.llama_tuned), _state(tiny_model_dirs.llama_untuned)
    cfg = cpu_scorer_config(tiny_model_dirs.llama_tuned, tiny_model_dirs.llama_untuned, expo_alpha=alpha)
    scorer = ImplicitRewardScorer.from_config(cfg)
    got = scorer.tuned.model.state_dict()
    changed = 0
    for name, t in tuned_sd.items():
        want = t + alpha * (t - untuned_sd[name])
        assert torch.allclose(got[name], want, atol=1e-6, rtol=0), name
        changed += int(not torch.equal(t, untuned_sd[name]))
    assert changed > 10  # the checkpoints really differ, so the formula moved them
    for name, u in untuned_sd.items():  # the untuned side is left as it was
        assert torch.equal(scorer.untuned.model.state_dict()[name], u)


async def test_alpha_zero_equals_the_plain_pair(tiny_model_dirs: TinyModelDirs):
    plain_cfg = cpu_scorer_config(tiny_model_dirs.llama_tuned, tiny_model_dirs.llama_untuned, attn_implementation="eager")
    plain = ImplicitRewardScorer.from_config(plain_cfg)
    expo0 = ImplicitRewardScorer.from_config(plain_cfg.model_copy(update={"expo_alpha": 0.0}))
    expo1 = ImplicitRewardScorer.from_config(plain_cfg.model_copy(update={"expo_alpha": 1.0}))
    for name, p in plain.tuned.model.state_dict().items():
        assert torch.equal(expo0.tuned.model.state_dict()[name], p)
    base, zero, one = await _scores(plain), await _scores(expo0), await _scores(expo1)
    assert zero == base
    assert all(abs(a - b) > 1e-3 for a, b in zip(one, base))
    for s in (plain, expo0, expo1):
        await s.aclose()


def test_tied_parameters_are_extrapolated_once():
    tok = build_tokenizer_a()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(1)
    tuned = LlamaForCausalLM(cfg)
    torch.manual_seed(2)
    untuned = LlamaForCausalLM(cfg)
    t0, u0 = tuned.model.embed_tokens.weight.clone(), untuned.model.embed_tokens.weight.clone()
    extrapolate(tuned, untuned, 0.5)
    assert tuned.lm_head.weight is tuned.model.embed_tokens.weight
    assert torch.allclose(tuned.model.embed_tokens.weight, t0 + 0.5 * (t0 - u0), atol=1e-6, rtol=0)


def test_bf16_is_combined_in_float32_and_rounded_once():
    tok = build_tokenizer_a()
    tuned = build_tiny_model("llama", tok, seed=1).to(torch.bfloat16)
    untuned = build_tiny_model("llama", tok, seed=2).to(torch.bfloat16)
    t = {k: v.float() for k, v in tuned.state_dict().items()}
    u = {k: v.float() for k, v in untuned.state_dict().items()}
    extrapolate(tuned, untuned, 0.3)
    for name, p in tuned.state_dict().items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, (t[name] + 0.3 * (t[name] - u[name])).to(torch.bfloat16)), name


def test_pairs_that_cannot_be_extrapolated(tiny_model_dirs: TinyModelDirs):
    tok_a, tok_b = build_tokenizer_a(), build_tokenizer_b()
    llama, mistral, gpt2 = (build_tiny_model(a, t, seed=1) for a, t in (("llama", tok_a), ("mistral", tok_a), ("gpt2", tok_b)))
    with pytest.raises(ValueError, match="one architecture: LlamaForCausalLM vs GPT2LMHeadModel"):
        extrapolate(llama, gpt2, 0.5)
    with pytest.raises(ValueError, match="one architecture"):
        extrapolate(llama, mistral, 0.5)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok_a), hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="parameter model.embed_tokens.weight has shape"):
        extrapolate(llama, wider, 0.5)
    other_vocab = build_tiny_model("llama", tok_a, seed=2)
    with pytest.raises(ValueError, match="same vocabulary"):
        extrapolate(llama, other_vocab, 0.5, tuned_tokenizer=tok_a, untuned_tokenizer=tok_b)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match="two different checkpoints"):
        extrapolate(llama, llama, 0.5)
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in before.items())  # refused before touching anything

    # Through the config: a mixed pair and a prompt-contrast pair are refused at load time.
    with pytest.raises(ValueError, match="one architecture"):
        ImplicitRewardScorer.from_config(cpu_scorer_config(tiny_model_dirs.mistral, tiny_model_dirs.gpt2, expo_alpha=0.5))
    spec = ModelSpec(path=str(tiny_model_dirs.llama_tuned))
    contrast = cpu_scorer_config(tiny_model_dirs.llama_tuned, tiny_model_dirs.llama_tuned, expo_alpha=0.5)
    contrast = contrast.model_copy(update={"untuned": spec.model_copy(update={"system_prompt": "Be neutral."})})
    with pytest.raises(ValueError, match="two different checkpoints"):
        ImplicitRewardScorer.from_config(contrast)
