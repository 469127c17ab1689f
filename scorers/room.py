"""What the guide scores of a response longer than its context: the longest prefix that fits.

The up-front check (scorers.base.check_room) counts one guide token per upstream token: it runs
before any text exists. A text can re-tokenize longer in a guide's tokenizer (another vocabulary,
runs of whitespace, digits, emoji), so a search can reach a response that does not fit after the
prompt in the scoring models' positions. That is not an error: the upstream was already paid.
Every scorer (the incremental and full-recompute local paths, the remote one) scores such a
response as the longest prefix of its *text* whose tokens fit after the prompt on every side of
the pair, as unfinished (its end, and the EOS term, were cut off).

Why a prefix of the text, the same on both sides: the score is a log-ratio, log p_tuned(y) -
log p_untuned(y), and it means something only when both models score the same `y` after the same
prompt. Cutting each side's tokens at its own limit would compare different texts when the two
tokenizers differ; scoring the tail (dropping the response's first tokens, or the prompt's)
would condition on a context the models never see whole and would move every cached position at
each step. A prefix keeps the prompt whole, keeps both sides on one text, and is what a full
recompute of that text gives, so the incremental path stays exact; its caches are reused as the
beam grows past the room (the clipped prefix barely moves). The price: continuations that differ
only past the room tie on the guide's score.

The prefix is found by bisection over characters: it fits, and one more character does not
(token counts are not monotone in the prefix length, so it is *a* longest prefix, not always the
longest). Only a prompt that fills the positions by itself is an error: ScorerContextError, which
the search's planning (check_room) already refuses before anything is paid.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scorers.base import ScorerContextError
from scorers.reading import ModelReading, PromptEncoding, ResponseTokens


@dataclass(frozen=True)
class Fitted:
    """What one response is scored as."""

    text: str
    """The response, or the longest prefix of it that fits on every side."""
    finished: bool
    """Whether EOS is scored: finished, and nothing was cut."""
    seqs: tuple[ResponseTokens, ...]
    """Per side, prompt + `text` ids, without EOS (see `with_eos`)."""
    clipped: bool


def with_eos(side: ModelReading, seq: ResponseTokens) -> ResponseTokens:
    return ResponseTokens([*seq.ids, side.eos_id()], seq.boundary)


def _fits(seqs: Sequence[ResponseTokens], limits: Sequence[int | None], extra: int) -> bool:
    return all(limit is None or len(s.ids) + extra <= limit for s, limit in zip(seqs, limits))


def fit_response(sides: Sequence[ModelReading], prompts: Sequence[PromptEncoding], text: str,
                 finished: bool) -> Fitted:
    """`text` as the pair scores it: whole when prompt + text (+ EOS when finished) fits every
    side's positions, else its longest prefix that fits, unfinished. ScorerContextError when a
    prompt alone is longer than its side's positions."""
    limits = [side.position_limit() for side in sides]

    def encode(cut: int) -> tuple[ResponseTokens, ...]:
        return tuple(side.encode_response(p, text[:cut], False) for side, p in zip(sides, prompts))

    seqs = encode(len(text))
    if _fits(seqs, limits, int(finished)):
        return Fitted(text, finished, seqs, False)
    for side, prompt, limit in zip(sides, prompts, limits):
        if limit is not None and len(prompt.ids) > limit:
            raise ScorerContextError("prompt", f"{side.name}: the prompt's {len(prompt.ids)} tokens exceed the "
                                               f"model's {limit} positions")
    if _fits(seqs, limits, 0):  # the text fits, its EOS does not
        return Fitted(text, False, seqs, True)
    lo, hi, best = 0, len(text), encode(0)  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probe = encode(mid)
        if _fits(probe, limits, 0):
            lo, best = mid, probe
        else:
            hi = mid
    return Fitted(text[:lo], False, best, True)
