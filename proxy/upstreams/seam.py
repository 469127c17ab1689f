"""The seam between a partial answer and its continuation, for APIs that prefill an assistant turn.

The search keeps a beam as the concatenation of the chunks the API returned, so a chunk must be
exactly what extends the text we sent. Some APIs refuse a prefilled turn that ends in whitespace
(Anthropic answers 400) or strip it before the model sees it. For those the trailing
whitespace is held back from the request (`hold_trailing_whitespace`), and the continuation is
joined on (`join_held`): where it repeats what was held back, that part is dropped so nothing is
doubled; whatever it does not repeat is kept as returned, so nothing it returned is lost.
"""
from __future__ import annotations


def hold_trailing_whitespace(partial: str) -> tuple[str, str]:
    """(what to send, what is held back): `partial` without, and with only, its trailing whitespace."""
    sent = partial.rstrip()
    return sent, partial[len(sent):]


def join_held(held: str, text: str) -> str:
    """The chunk to keep after a partial answer whose trailing `held` whitespace was not sent:
    `text` without the longest prefix it shares with `held` (the beam already ends with it)."""
    common = 0
    for a, b in zip(held, text):
        if a != b:
            break
        common += 1
    return text[common:]
