"""Tiny random causal LMs and tokenizers, built offline in a couple of seconds, saved to disk.

They test arithmetic, not quality: every model here loads through `scorers.loading` by local
path exactly as a real one would. Two tokenizers differ on purpose (vocabulary, merges, and
whether BOS comes from the tokenizer or from the chat template) so a scorer pair can be built
whose tuned and untuned models do not share token boundaries.

Fixtures (session-scoped; import them into a conftest or a test module by name):
    tiny_model_dirs           TinyModelDirs: four saved model directories (see the class)
    tiny_scorer_config        ScorerConfig: llama_tuned vs llama_untuned, same tokenizer, CPU fp32
    tiny_mixed_scorer_config  ScorerConfig: mistral (tokenizer A) vs gpt2 (tokenizer B), CPU fp32
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from proxy.config import ModelSpec, ScorerConfig
from scorers.templates import OPENCHAT, ZEPHYR

Arch = Literal["llama", "mistral", "gpt2"]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

TEXT_A = [
    "Weak-to-strong search steers a large language model with a pair of small ones. The tuned "
    "model and its untuned parent disagree about which answers are good, and the difference of "
    "their log-probabilities is a reward that needs no extra training.",
    "The strong model writes a few tokens at a time. Each chunk is scored by the small pair, and "
    "only the best beams survive to the next step. When every beam has finished, the best one "
    "is returned to the user, who never sees the search.",
    "Hello there! How are you today? I would like a short poem about the sea, the wind and the "
    "rain, and then a list of three fruits: apples, oranges and pears.",
    "Instruction: Write a haiku about autumn leaves.\nOutput: Red leaves drift and fall,\n"
    "whispering to the cold ground,\nthe year breathes slowly.",
]

TEXT_B = [
    "A tokenizer maps text to integers. Different tokenizers cut the same sentence at different "
    "places, so two models may not agree on where a word begins or ends.",
    "Numbers like 3.14159 and 2024, symbols such as #, @ and %, and punctuation; all of them "
    "must survive a round trip through the vocabulary without loss.",
    "Once upon a time a small fox lived at the edge of a forest. Every morning it walked to the "
    "river to drink, and every evening it returned home before dark.",
]


def _train_bpe(texts: list[str], vocab_size: int, *, use_regex: bool) -> Tokenizer:
    """Byte-level BPE: every byte is in the alphabet, so any unicode text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _wrap(tok: Tokenizer, chat_template: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=chat_template,
    )


def build_tokenizer_a() -> PreTrainedTokenizerFast:
    """Llama-like: ~400 tokens, BOS added by the tokenizer itself, zephyr chat template."""
    tok = _train_bpe(TEXT_A, 400, use_regex=True)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return _wrap(tok, ZEPHYR)


def build_tokenizer_b() -> PreTrainedTokenizerFast:
    """Different on purpose: ~300 tokens, other text, merges across word boundaries, no BOS from
    the tokenizer (its openchat template writes `<s>` itself)."""
    return _wrap(_train_bpe(TEXT_B, 300, use_regex=False), OPENCHAT)


def _config(arch: Arch, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """A few layers, hidden 32-64; a wide initializer so that next-token distributions are sharp
    and an off-by-one position shows up in the numbers."""
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    if arch == "gpt2":
        return GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=512, **common)
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **sizes, **common)
    return LlamaConfig(**sizes, **common)


_MODEL_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "gpt2": GPT2LMHeadModel}


def build_tiny_model(arch: Arch, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    """A randomly initialised fp32 model; the seed makes a tuned/untuned pair differ reproducibly."""
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[arch](_config(arch, tokenizer))
    return model.eval()


def save_tiny_model(directory: Path, arch: Arch, tokenizer: PreTrainedTokenizerFast, seed: int) -> Path:
    """Build and save model + tokenizer to `directory`, loadable by `load_causal_lm`."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_model(arch, tokenizer, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class TinyModelDirs:
    llama_tuned: Path
    """Llama, tokenizer A (BOS from the tokenizer, zephyr template), seed 1."""
    llama_untuned: Path
    """Llama, tokenizer A, seed 2."""
    mistral: Path
    """Mistral, tokenizer A, seed 3."""
    gpt2: Path
    """GPT-2, tokenizer B (different vocabulary; BOS from its openchat template), seed 4."""


def build_tiny_model_dirs(root: Path) -> TinyModelDirs:
    tok_a, tok_b = build_tokenizer_a(), build_tokenizer_b()
    return TinyModelDirs(
        llama_tuned=save_tiny_model(root / "llama-tuned", "llama", tok_a, seed=1),
        llama_untuned=save_tiny_model(root / "llama-untuned", "llama", tok_a, seed=2),
        mistral=save_tiny_model(root / "mistral", "mistral", tok_a, seed=3),
        gpt2=save_tiny_model(root / "gpt2", "gpt2", tok_b, seed=4),
    )


def cpu_scorer_config(tuned: Path, untuned: Path, **fields: object) -> ScorerConfig:
    """A CPU fp32 scorer config over two local model directories (templates: the tokenizers' own)."""
    return ScorerConfig(
        tuned=ModelSpec(path=str(tuned)),
        untuned=ModelSpec(path=str(untuned)),
        device="cpu",
        dtype="float32",
        **fields,
    )


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> TinyModelDirs:
    return build_tiny_model_dirs(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_scorer_config(tiny_model_dirs: TinyModelDirs) -> ScorerConfig:
    return cpu_scorer_config(tiny_model_dirs.llama_tuned, tiny_model_dirs.llama_untuned)


@pytest.fixture(scope="session")
def tiny_mixed_scorer_config(tiny_model_dirs: TinyModelDirs) -> ScorerConfig:
    return cpu_scorer_config(tiny_model_dirs.mistral, tiny_model_dirs.gpt2)


Loaded = tuple[torch.nn.Module, object, ModelSpec]
"""(model, tokenizer, spec): what ImplicitRewardScorer.from_loaded takes for each side."""


def load_eager(path: Path, **spec_fields: object) -> Loaded:
    """Eager attention: bit-identical across padding and lengths, so 1e-5 is a real bound.
    (SDPA's CPU kernels depend on sequence length; see test_sdpa_default_is_close.)"""
    from scorers.loading import load_causal_lm

    spec = ModelSpec(path=str(path), **spec_fields)
    model, tokenizer = load_causal_lm(spec, torch.device("cpu"), torch.float32, attn_implementation="eager")
    return model, tokenizer, spec


@pytest.fixture(scope="module")
def llama_pair(tiny_model_dirs: TinyModelDirs) -> tuple[Loaded, Loaded]:
    """Same tokenizer, different weights."""
    return load_eager(tiny_model_dirs.llama_tuned), load_eager(tiny_model_dirs.llama_untuned)


@pytest.fixture(scope="module")
def mixed_pair(tiny_model_dirs: TinyModelDirs) -> tuple[Loaded, Loaded]:
    """Different tokenizers and architectures; tokenizer B merges across word boundaries, so seams move often."""
    return load_eager(tiny_model_dirs.mistral), load_eager(tiny_model_dirs.gpt2)
