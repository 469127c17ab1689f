"""Where the Anthropic family puts `cache_control` breakpoints, so a search's re-sent prefixes
are read from Anthropic's prompt cache instead of billed in full.

Anthropic caches a prompt prefix only at a breakpoint (at most 4 a request), reads a cached
prefix only at a block boundary, charges a write (1.25x, or 2x for an hour) and a read (0.1x),
caches nothing shorter than the model's minimum, and makes an entry readable only once the
request that wrote it has begun answering, so parallel twins each pay a write if each asks for
one. The rules here follow from that:

- the conversation (system and turns, before any prefill) ends with a breakpoint once it was
  written: every later request of a search, and every search of the same conversation, reads it;
- a prefill is split at the longest earlier prefill of the same conversation this upstream
  wrote that it starts with (the parent beam's text, written when the parent was expanded), a
  breakpoint there reads it;
- what is new (the conversation at the first step, the prefill after) gets a breakpoint, a write,
  on one request of a beam's K parallel requests only (its children's requests read it at the
  next step; its twins could not);
- no breakpoint on a prefix under `cache_min_tokens` (counted with the upstream's encoding, an
  estimate of Anthropic's tokenizer).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from proxy.config import AnthropicConfig
from proxy.cost import count_tokens
from proxy.types import Conversation
from proxy.upstreams.base import conversation_key

MAX_REMEMBERED = 4096
"""Written prefills remembered (least recently used forgotten): a bound on memory, not on hits."""


def _text_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else [dict(b) for b in content]


class Breakpoints:
    """Remembers what this upstream wrote and marks the request bodies of the next ones."""

    def __init__(self, cfg: AnthropicConfig) -> None:
        self.cfg = cfg
        self.mark: dict[str, Any] = {"type": "ephemeral"} if cfg.cache_ttl == "5m" else {"type": "ephemeral",
                                                                                           "ttl": "1h"}
        self.written: OrderedDict[tuple[str, str], None] = OrderedDict()

    def _long_enough(self, text: str) -> bool:
        return count_tokens(text, self.cfg.encoding) >= self.cfg.cache_min_tokens

    def _parent(self, key: str, prefill: str) -> str:
        """The longest written prefill of this conversation that `prefill` starts with ("" if none)."""
        best = ""
        for (k, written) in self.written:
            if k == key and len(written) > len(best) and prefill.startswith(written):
                best = written
        if best:
            self.written.move_to_end((key, best))
        return best

    def bodies(self, conversation: Conversation, system: str, messages: list[dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
        """(messages of the one request that writes, messages of its twins, the prefill it writes:
        "" for the conversation alone, None for nothing). Without prompt caching both are
        `messages` as they are."""
        if not self.cfg.prompt_caching or not messages:
            return messages, messages, None
        key = conversation_key(conversation)
        prefilled = messages[-1]["role"] == "assistant"
        prefill = messages[-1]["content"] if prefilled else ""
        assert isinstance(prefill, str)
        head = [dict(m) for m in (messages[:-1] if prefilled else messages)]
        text = system + "".join(b["text"] for m in head for b in _text_blocks(m["content"]))
        conversation_read = (key, "") in self.written
        parent = self._parent(key, prefill) if prefilled else ""
        writes = not (parent == prefill and (parent or conversation_read)) and self._long_enough(text + prefill)

        def build(write: bool) -> list[dict[str, Any]]:
            turns = [dict(m) for m in head]
            if turns and (conversation_read or write) and self._long_enough(text):
                blocks = _text_blocks(turns[-1]["content"])
                blocks[-1] = {**blocks[-1], "cache_control": self.mark}
                turns[-1]["content"] = blocks
            read_parent = bool(parent) and self._long_enough(text + parent)
            if not prefilled or not (read_parent or write):
                return turns + ([] if not prefilled else [dict(messages[-1])])
            blocks = []
            if read_parent:  # read where the parent beam was written
                blocks.append({"type": "text", "text": parent, "cache_control": self.mark})
            rest = prefill[len(blocks[0]["text"]):] if blocks else prefill
            if rest:
                blocks.append({"type": "text", "text": rest, **({"cache_control": self.mark} if write else {})})
            return turns + [{"role": "assistant", "content": blocks}]

        twins = build(False)
        return (build(True), twins, prefill) if writes else (twins, twins, None)

    def wrote(self, conversation: Conversation, prefill: str) -> None:
        """A request that writes `prefill` was answered: its children may read it (and every
        later request the conversation, which it wrote on the way)."""
        for entry in {(conversation_key(conversation), ""), (conversation_key(conversation), prefill)}:
            self.written[entry] = None
            self.written.move_to_end(entry)
        while len(self.written) > MAX_REMEMBERED:
            self.written.popitem(last=False)
