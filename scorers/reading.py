"""How one side of a scoring pair reads a conversation and a response: its chat template, its
tokenizer, where the response starts on the token level, the EOS term, and how long a sequence
may be. Needs a tokenizer only, never weights.

Both scorer kinds start from here: the local one (scorers.implicit, whose `ScoringModel` adds the
weights) and the remote one (scorers.remote, whose engine holds them), so they cannot disagree
about which tokens are scored.

Each model reads the prompt through its own chat template and the response through its own
tokenizer, so the pair need not share a vocabulary with each other or with the upstream. The
response's log-probability is summed from the first token that differs from the prompt's own
tokenization: a token merged across the prompt/response seam belongs to the response, which is
what the model would have had to generate.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from proxy.types import ChatMessage


@dataclass(frozen=True)
class PromptEncoding:
    """A rendered prompt and its token ids, tokenized the way every response will be."""

    text: str
    ids: list[int]
    add_special_tokens: bool


@dataclass(frozen=True)
class ResponseTokens:
    """Token ids of prompt + response (+ EOS when finished); positions [boundary, len) are scored."""

    ids: list[int]
    boundary: int

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.boundary


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def needs_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether tokenizing `text` should add special tokens: a text a template already opened
    with the BOS token must not get a second one."""
    bos = tokenizer.bos_token
    return not (bos is not None and text.startswith(bos))


@dataclass(eq=False, kw_only=True)
class ModelReading:
    """One side of the pair as text and tokens: a tokenizer, how it wants a chat rendered, and
    the longest sequence its model takes (None: unknown)."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None = None
    """Resolved jinja, or None for the tokenizer's own template."""
    system_prompt: str | None = ""
    """System turn prepended when the messages have none; None = no system turn."""
    name: str = "model"
    max_len: int | None = None
    """Positions the model takes; a subclass that holds the model may read it from there."""

    def position_limit(self) -> int | None:
        return self.max_len

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text this model would see before writing its answer."""
        msgs = list(messages)
        if self.system_prompt is not None and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": self.system_prompt}, *msgs]
        try:
            rendered = self.tokenizer.apply_chat_template(
                msgs, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja errors and "no chat template" alike need the model's name
            hint = " (set chat_template, e.g. 'raw' for a base model, or system_prompt: null)"
            raise ValueError(f"{self.name}: cannot render the chat prompt: {e}{hint}") from e
        if not isinstance(rendered, str):
            raise ValueError(f"{self.name}: the chat template did not render to a string")
        return rendered

    def encode_prompt(self, prompt_text: str) -> PromptEncoding:
        """Tokenize the rendered prompt; a template that writes its own BOS must not get a second."""
        add_special = needs_bos(self.tokenizer, prompt_text)
        return PromptEncoding(prompt_text, self._tokenize(prompt_text, add_special), add_special)

    def encode_response(self, prompt: PromptEncoding, text: str, finished: bool) -> ResponseTokens:
        """Ids of prompt + `text` (+ EOS if finished) and where the response starts on the token level.

        The boundary is the common prefix with the prompt's own ids, so a seam token merged
        across the boundary counts as response. At least one context token (e.g. BOS) is needed
        to predict the first response token.
        """
        full = self._tokenize(prompt.text + text, prompt.add_special_tokens) if text else list(prompt.ids)
        boundary = common_prefix_len(full, prompt.ids)
        if boundary == 0:
            raise ValueError(
                f"{self.name}: the prompt gives no context token before the response "
                "(empty prompt and no BOS); cannot score the first response token"
            )
        if finished:
            full.append(self.eos_id())
        return ResponseTokens(full, boundary)

    def check_length(self, seq: ResponseTokens) -> None:
        """ValueError when prompt + response is longer than the model takes."""
        limit = self.position_limit()
        if limit is not None and len(seq.ids) > limit:
            raise ValueError(f"sequence of {len(seq.ids)} tokens exceeds the model's {limit} positions")

    def response_room(self, prompt_text: str) -> int | None:
        """Tokens a response (EOS included) can have after this prompt before the sequence
        passes the model's positions; None when the model names no limit."""
        limit = self.position_limit()
        if limit is None:
            return None
        return limit - len(self.encode_prompt(prompt_text).ids)

    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{self.name}: the tokenizer has no eos_token, so a finished response cannot be scored")
        return int(eos)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
