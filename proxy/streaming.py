"""Which part of a running search's answer can already be sent to a streaming client.

The search keeps W beams after every step, and every later beam, and so the answer, extends
one of them: a child is its parent's text plus a chunk, and a finished beam is carried as it
is. So the common prefix of all survivors of a step is final; anything past it can still be
replaced by a sibling's text. `SettledText` turns that growing prefix into deltas to send.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence


def common_prefix(texts: Sequence[str]) -> str:
    """Longest string every text starts with ("" for no texts)."""
    if not texts:
        return ""
    return os.path.commonprefix(list(texts))


class SettledText:
    """Tracks what was sent and returns only the new part of each settled prefix.

    `display` maps the answer so far to what the client sees (e.g. dropping leading spaces for
    chat); it must keep prefixes as prefixes, which `str.lstrip` does.
    """

    def __init__(self, display: Callable[[str], str] = lambda s: s) -> None:
        self._display = display
        self.sent = ""

    def advance(self, settled: str) -> str:
        """The delta to send now that `settled` can no longer change."""
        shown = self._display(settled)
        if not shown.startswith(self.sent):
            # The search's invariant was broken; sending more would corrupt the client's text.
            raise RuntimeError("settled text was contradicted by a later step")
        delta = shown[len(self.sent):]
        self.sent = shown
        return delta
