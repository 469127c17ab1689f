"""Openings of film reviews for tuning the guide, kept apart from the benchmark's test openings.

The paper tunes its small guide on prompts of the same kind the search later sees (the first
words of a review) and judges what the model writes next. These openings are neutral, so the
opinion is the continuation's to give, and they stop mid-sentence, so the next words have to
carry it. They are built from hand-written parts (a film described in a few words, and a way a
reviewer starts talking about it), every film with every framing, so that tone comes from the
continuation and not from any one opening; the fixed shuffle spreads both parts over the tuple,
so any slice (a held-out tail, a small `--prompts` run) sees many genres and framings.
"""
from __future__ import annotations

import random

FILMS: tuple[str, ...] = (
    "the new thriller from a first-time director",
    "this sprawling family drama set in rural Ohio",
    "the latest superhero sequel",
    "the animated musical about a lost penguin",
    "this low-budget horror film",
    "the period romance adapted from a Victorian novel",
    "the documentary about deep-sea fishermen",
    "this science-fiction epic set on a dying planet",
    "the remake of a classic heist comedy",
    "the courtroom drama starring two veteran actors",
    "this coming-of-age story set in a small coastal town",
    "the war film shot almost entirely in one trench",
    "the biopic of a jazz pianist",
    "this quiet Korean drama about two sisters",
    "the third film in the slasher franchise",
    "the romantic comedy set at a wedding in Rome",
    "the western about a widowed rancher",
    "this French art-house film about a lighthouse keeper",
    "the space adventure aimed at younger audiences",
    "the political thriller set in a Washington newsroom",
    "this stop-motion fantasy about a clockmaker",
    "the sports drama about a college rowing team",
    "the disaster movie about a collapsing dam",
    "this mystery set aboard a night train",
    "the festival favorite about a retired schoolteacher",
    "the martial arts film from Hong Kong",
    "the musical biopic of a country singer",
    "this psychological thriller about an insomniac",
    "the zombie comedy set in a shopping mall",
    "the three-hour historical epic about a medieval siege",
)
"""A film in a few words: genre, setting or premise, never a verdict."""

FRAMINGS: tuple[str, ...] = (
    "I watched {film} last night, and I have to say that",
    "{film} arrived in theaters this weekend, and after sitting through all of it I think",
    "Going into {film}, I did not know what to expect, and by the end",
    "After months of buzz, {film} is finally here, and the result is",
    "There is a moment halfway through {film} when",
    "My honest take on {film} is that the story",
    "{film} runs just under two hours, and most of that time",
    "Having now seen {film} twice, I can say the performances",
    "The first thing you notice about {film} is",
    "It is hard to sum up {film} in one sentence, but overall it",
    "Critics have been split on {film}, and after a screening last week I found it",
    "{film} asks a lot of its audience, and whether that pays off",
)
"""How a reviewer starts: each ends mid-sentence, where the next words must take a side."""


def _opening(framing: str, film: str) -> str:
    text = framing.format(film=film)
    return text[0].upper() + text[1:]


def _build(seed: int = 0) -> tuple[str, ...]:
    openings = [_opening(framing, film) for framing in FRAMINGS for film in FILMS]
    random.Random(seed).shuffle(openings)
    return tuple(openings)


TRAIN_OPENINGS: tuple[str, ...] = _build()
"""360 distinct openings (30 films x 12 framings), in a fixed shuffled order."""
