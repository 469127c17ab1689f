"""A seeded toy language model, for tests and benchmarks only: no weights, no network, exact.

The "model" is a tiny Markov chain over a fixed vocabulary of words. Every vocabulary entry is
a space followed by a word, and is exactly one token in the tiktoken encoding, also when
entries are concatenated. So generated text re-tokenizes to exactly the number of words that
were sampled, and a "length" finish has exactly `max_tokens` tokens, as with a real model.

The next-word distribution depends only on the last two whitespace-separated words of
`prompt + text so far`, so continuing a prompt and continuing that prompt extended by a
generated chunk give the same distribution: the chain behaves like a language model under
chunked (beam) search.
"""
from __future__ import annotations

import bisect
import functools
import math
import random
import secrets
from collections.abc import Sequence

import tiktoken

from proxy.cost import get_encoding as load_encoding
from proxy.local.backend import Choice
from proxy.protocol.model_requests import CompletionParams
from proxy.types import choice_seed, first_stop, stable_int

#: Common English words, most frequent first (the order sets a Zipf-like prior). Each, with its
#: leading space, is one cl100k_base token; `check_vocab` verifies this at construction time.
DEFAULT_VOCAB: tuple[str, ...] = tuple(" " + w for w in (
    "the a and to of in on it was is with by cat dog sat ran mat big red small old new happy "
    "little house tree sun sky bird fish jumped ate slept near from under over green blue one two"
).split())

_LOGIT_SCALE = 2.0  # std-dev of the context-dependent part of the logits


@functools.lru_cache(maxsize=16)
def check_vocab(encoding: str, vocab: tuple[str, ...]) -> None:
    """Raise ValueError unless every entry is " word", one token alone and next to any other.

    The pairwise check is what makes "n words sampled == n tokens in the text" hold: BPE merges
    never cross pre-tokenizer boundaries, and those boundaries only depend on neighbours.
    """
    if len(vocab) < 2:
        raise ValueError("vocab needs at least two entries (a word never follows itself)")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab has duplicate entries")
    enc = load_encoding(encoding)
    for w in vocab:
        if len(w) < 2 or w[0] != " " or any(c.isspace() for c in w[1:]):
            raise ValueError(f"vocab entry {w!r} must be a space followed by a word without whitespace")
        if len(enc.encode_ordinary(w)) != 1:
            raise ValueError(f"vocab entry {w!r} is not a single {encoding} token")
    for a in vocab:
        for b in vocab:
            if len(enc.encode_ordinary(a + b)) != 2:
                raise ValueError(f"vocab entries {a!r}{b!r} do not tokenize as two tokens")


def _stable_unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from `parts`."""
    return stable_int(*parts) / 2.0**64


class ToyModel:
    """A second-order Markov chain over `vocab`, plus an end-of-sequence event.

    logits(context) = prior (Zipf over vocab order) + N(0, 2) noise seeded by the last two
    words, so every context has its own stable, peaked distribution; the last word itself is
    excluded (no immediate repeats). EOS is a separate coin with probability `eos_prob` at
    every position (never part of the text).
    """

    def __init__(self, vocab: Sequence[str], eos_prob: float) -> None:
        self.vocab = tuple(vocab)
        self.eos_prob = eos_prob
        self._words = tuple(w.strip() for w in self.vocab)
        self._index = {w: i for i, w in enumerate(self._words)}
        self._prior = [-0.5 * math.log(i + 1) for i in range(len(self.vocab))]
        self._logits: dict[tuple[str, str], list[float]] = {}

    def logits(self, context: tuple[str, str]) -> list[float]:
        """Next-word logits after the words `context` (the last two words of the text)."""
        cached = self._logits.get(context)
        if cached is None:
            if len(self._logits) > 100_000:  # prompts bring arbitrary words: bound the cache
                self._logits.clear()
            rng = random.Random(stable_int("logits", *context))
            cached = [p + rng.gauss(0.0, _LOGIT_SCALE) for p in self._prior]
            last = self._index.get(context[1])
            if last is not None:  # no immediate repeats: greedy text would stick at "is is is"
                cached[last] = -math.inf
            self._logits[context] = cached
        return cached

    def _distribution(self, context: tuple[str, str], temperature: float,
                      top_p: float) -> tuple[list[int], list[float]]:
        """(word indexes, cumulative probabilities) after temperature and nucleus filtering."""
        logits = self.logits(context)
        top = max(logits)
        probs = [math.exp((x - top) / temperature) for x in logits]
        total = sum(probs)
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        kept: list[int] = []
        cum: list[float] = []
        acc = 0.0
        for i in order:
            kept.append(i)
            acc += probs[i] / total
            cum.append(acc)
            if acc >= top_p:
                break
        return kept, cum

    def generate(self, params: CompletionParams, index: int, stop_encoder: tiktoken.Encoding,
                 cache: dict[tuple[str, str], tuple[list[int], list[float]]] | None = None) -> Choice:
        """Sample choice number `index` for `params`.

        Randomness: with a seed, a `random.Random` seeded from (prompt, seed, index) through
        SHA-256, so a request is reproducible across processes and choices differ; without
        one, fresh entropy. Temperature 0 uses neither: argmax, and EOS where a hash of
        (context, position) falls below eos_prob, so it is deterministic without a seed.
        Each step draws exactly two numbers (EOS coin, word), so the same seed with a larger
        max_tokens extends the same text. `cache` shares distributions between the choices
        of one request (they have the same temperature and top_p).
        """
        greedy = params.temperature == 0
        if params.seed is not None:
            rng = random.Random(choice_seed(params.prompt, params.seed, index))
        else:
            rng = random.Random(secrets.randbits(64))
        cache = {} if cache is None else cache
        prompt_words = params.prompt.split()
        padded = ["", ""] + prompt_words[-2:]
        context: tuple[str, str] = (padded[-2], padded[-1])
        position = len(prompt_words)
        stops = params.stop
        tail_len = max((len(s) for s in stops), default=0) + max(len(w) for w in self.vocab)
        pieces: list[str] = []
        tail = ""
        for _ in range(params.max_tokens):
            if greedy:
                eos = _stable_unit("eos", *context, position) < self.eos_prob
            else:
                eos = rng.random() < self.eos_prob
            if eos:
                return Choice("".join(pieces), "stop", len(pieces))
            if greedy:
                logits = self.logits(context)
                i = logits.index(max(logits))
            else:
                dist = cache.get(context)
                if dist is None:
                    dist = cache[context] = self._distribution(context, params.temperature, params.top_p)
                kept, cum = dist
                i = kept[min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(kept) - 1)]
            pieces.append(self.vocab[i])
            context = (context[1], self._words[i])
            position += 1
            if stops:
                tail = (tail + self.vocab[i])[-tail_len:]
                if any(s in tail for s in stops):
                    # Every earlier step found no stop, so all matches end in this word:
                    # cut at the earliest-starting one, as the API does.
                    text = "".join(pieces)
                    text = text[:first_stop(text, stops)]
                    return Choice(text, "stop", len(stop_encoder.encode_ordinary(text)))
        return Choice("".join(pieces), "length", len(pieces))


class ToyBackend:
    """`ToyModel` behind the local completions server: choices and the prompt's token count in
    `encoding` (the tokenizer the toy's vocabulary was checked against)."""

    def __init__(self, vocab: Sequence[str] | None = None, eos_prob: float = 0.08,
                 encoding: str = "cl100k_base") -> None:
        if not 0.0 <= eos_prob <= 1.0:
            raise ValueError(f"eos_prob must be in [0, 1], got {eos_prob}")
        vocab_t = tuple(DEFAULT_VOCAB if vocab is None else vocab)
        check_vocab(encoding, vocab_t)
        self.lm = ToyModel(vocab_t, eos_prob)
        self.encoding = load_encoding(encoding)

    async def complete(self, params: CompletionParams) -> tuple[list[Choice], int]:
        cache: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        choices = [self.lm.generate(params, i, self.encoding, cache) for i in range(params.n)]
        return choices, len(self.encoding.encode_ordinary(params.prompt))
