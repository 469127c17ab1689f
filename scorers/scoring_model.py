"""One side of a local scoring pair: the causal LM in this process, with its reading rules.

The rules (templates, tokenization, the prompt/response boundary, EOS) are scorers.reading's,
shared with the remote scorer; this adds the weights. Both local paths (full recompute and
incremental) start from `encode_prompt` / `encode_response`, so they cannot disagree about
which tokens are scored.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from proxy.config import ModelSpec
from scorers.reading import ModelReading
from scorers.templates import resolve_template


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model can position, where its config says so."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


@dataclass(eq=False, kw_only=True)
class ScoringModel(ModelReading):
    """One side of the pair with its weights: how it reads text (ModelReading) and the model.

    `tokens_run` counts the real (non-padding) tokens this side has put through its model, so
    that tests and benchmarks can check how much work a scorer does, not just how fast it is.
    """

    model: PreTrainedModel
    tokens_run: int = 0

    @classmethod
    def from_spec(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> "ScoringModel":
        return cls(
            model=model,
            tokenizer=tokenizer,
            chat_template=resolve_template(spec.chat_template),
            system_prompt=spec.system_prompt,
            name=spec.path,
        )

    @property
    def pad_id(self) -> int:
        """Any id will do for padding (it is masked out), but it must be a valid embedding row."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def position_limit(self) -> int | None:
        return max_positions(self.model)
