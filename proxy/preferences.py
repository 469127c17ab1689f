"""Preference files: one JSON object a line, a prompt with a `chosen` and a `rejected` response.

The forms read are TRL's preference-dataset conventions (and UltraFeedback-binarized's, which is
one of them):

- standard, explicit prompt: `{"prompt": str, "chosen": str, "rejected": str}`;
- conversational: `chosen` and `rejected` are chat message lists (`{"role", "content"}`) whose
  last turn is the assistant's response. The prompt is the turns before it: `prompt` as a message
  list followed by the turns in front of the response (TRL's explicit form, where `chosen` is the
  assistant turn alone), or, with no list `prompt`, the turns in front of the response, which must
  be the same in `chosen` and `rejected` (TRL's implicit prompt; UltraFeedback-binarized, whose
  `prompt` string repeats the first user turn and is then not read). A string `prompt` in front
  of a lone assistant turn is that one user turn.

Other fields (`prompt_id`, `score_chosen`, ...) are ignored, as are blank lines and a header line
`{"meta": {...}}` (the first line `w2s tune` writes in its pairs.jsonl). A string `chosen` with no
`prompt` (TRL's implicit prompt on plain text) is refused: where the prompt ends is not written
down. Anything else that is not preference data is a PreferenceFileError naming the file's line.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from proxy.config import ConfigError
from proxy.types import ChatMessage

Prompt = Union[str, tuple[ChatMessage, ...]]
"""An instruction (a bare string: one user turn to a chat scorer, the text itself to a raw one)
or the conversation before the response."""


class PreferenceFileError(ConfigError):
    """A line that is not preference data; the message names the file, the line and the problem."""


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Message(_Loose):
    role: str
    content: str


class TextPair(_Loose):
    """`{"prompt": str, "chosen": str, "rejected": str}`."""

    prompt: str
    chosen: str
    rejected: str

    @field_validator("prompt", "chosen", "rejected")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty string")
        return value


class MessagesPair(_Loose):
    """`chosen`/`rejected` as message lists ending in the assistant's turn; `prompt` a string, a
    message list or absent."""

    prompt: str | list[Message] | None = None
    chosen: list[Message]
    rejected: list[Message]

    @field_validator("chosen", "rejected")
    @classmethod
    def _ends_with_answer(cls, turns: list[Message]) -> list[Message]:
        if not turns:
            raise ValueError("an empty message list")
        if turns[-1].role != "assistant":
            raise ValueError(f"the last turn is {turns[-1].role!r}, not the assistant's response")
        if not turns[-1].content.strip():
            raise ValueError("the assistant's response is an empty string")
        return turns


@dataclass(frozen=True)
class PreferencePair:
    """One line of a preference file: `chosen` and `rejected` are the two responses' texts."""

    prompt: Prompt
    chosen: str
    rejected: str
    line: int


def _turns(messages: list[Message]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role=m.role, content=m.content) for m in messages)


def _from_messages(pair: MessagesPair) -> tuple[Prompt, str, str]:
    before_chosen, before_rejected = _turns(pair.chosen[:-1]), _turns(pair.rejected[:-1])
    if before_chosen != before_rejected:
        raise ValueError("chosen and rejected differ before their last turn (they must answer the same prompt)")
    prompt: Prompt
    if isinstance(pair.prompt, list):
        prompt = _turns(pair.prompt) + before_chosen
    elif before_chosen:
        prompt = before_chosen  # UltraFeedback-binarized: the string prompt repeats the first turn
    elif isinstance(pair.prompt, str) and pair.prompt.strip():
        prompt = pair.prompt
    else:
        raise ValueError("no prompt: give `prompt` or the turns before the response in chosen/rejected")
    if not prompt or (not isinstance(prompt, str) and not any(m["content"].strip() for m in prompt)):
        raise ValueError("the prompt is empty")
    return prompt, pair.chosen[-1].content, pair.rejected[-1].content


def _problem(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def parse_pair(data: object) -> tuple[Prompt, str, str] | None:
    """(prompt, chosen, rejected) of one decoded line; None for a header line. ValueError says what
    is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if set(data) == {"meta"}:
        return None
    missing = [k for k in ("chosen", "rejected") if k not in data]
    if missing:
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         "(a preference line has prompt, chosen and rejected)")
    try:
        if isinstance(data["chosen"], list) or isinstance(data["rejected"], list):
            prompt, chosen, rejected = _from_messages(MessagesPair.model_validate(data))
        elif "prompt" not in data:
            raise ValueError("missing field prompt (string chosen/rejected need it: where the prompt ends "
                             "inside them is not written down)")
        else:
            text = TextPair.model_validate(data)
            prompt, chosen, rejected = text.prompt, text.chosen, text.rejected
    except ValidationError as e:
        raise ValueError(_problem(e)) from None
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same text")
    return prompt, chosen, rejected


def iter_pairs(path: str | Path, limit: int | None = None) -> Iterator[PreferencePair]:
    """The file's pairs in order (at most `limit`); PreferenceFileError at the first bad line."""
    p = Path(path)
    try:
        handle = p.open(encoding="utf-8")
    except OSError as e:
        raise PreferenceFileError(f"{p}: cannot read: {e.strerror}") from None
    count = 0
    with handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and count >= limit:
                return
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise PreferenceFileError(f"{p} line {number}: not JSON ({e.msg})") from None
            try:
                parsed = parse_pair(data)
            except ValueError as e:
                raise PreferenceFileError(f"{p} line {number}: {e}") from None
            if parsed is not None:
                count += 1
                yield PreferencePair(*parsed, line=number)


def read_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Every pair of the file (at most `limit`); PreferenceFileError for a bad line or none at all."""
    pairs = list(iter_pairs(path, limit))
    if not pairs:
        raise PreferenceFileError(f"{path}: no preference pairs (one JSON object a line with prompt, chosen "
                                  "and rejected)")
    return pairs
