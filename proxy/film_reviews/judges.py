"""Independent judges for the demo and the quality benchmark: sentiment lexicons, not language models.

The guidance pairs prefer positive text, one by contrasting two prompts on the same small model,
one by a DPO-tuned adapter whose training pairs VADER labelled. Judging with a guide would be
circular; a lexicon scores text from a hand-built word list and has no stake in any model's
log-probabilities. Two lexicons, because the tuned guide learned from VADER's labels: a gain
that shows on VADER alone could be the guide fitting its labeller, while TextBlob (pattern's
adjective lexicon) never took part in training.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from textblob.en.sentiments import PatternAnalyzer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def _pattern() -> PatternAnalyzer:
    return PatternAnalyzer()


def positivity(text: str) -> float:
    """VADER compound score in [-1, 1]: -1 very negative, +1 very positive, 0 for empty text."""
    return float(_vader().polarity_scores(text)["compound"]) if text.strip() else 0.0


def pattern_polarity(text: str) -> float:
    """TextBlob's pattern-lexicon polarity in [-1, 1], 0 for empty text or no opinion words."""
    return float(_pattern().analyze(text).polarity) if text.strip() else 0.0


JUDGES: dict[str, Callable[[str], float]] = {"vader": positivity, "textblob": pattern_polarity}
"""Judges by name; "vader" is the one the tuned guide's training pairs were labelled with."""
