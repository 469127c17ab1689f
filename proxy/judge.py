"""An independent judge for the demo: a sentiment lexicon (VADER), not a language model.

The demo's guidance pair prefers upbeat answers by contrasting two system prompts on the same
small model. Judging with that same pair would be circular; VADER scores text from a
hand-built word list, so it has no stake in the pair's log-probabilities.
"""
from __future__ import annotations

from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def positivity(text: str) -> float:
    """VADER compound score in [-1, 1]: -1 very negative, +1 very positive, 0 for empty text."""
    return float(_analyzer().polarity_scores(text)["compound"]) if text.strip() else 0.0
