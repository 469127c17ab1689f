"""What an upstream honours (n > 1, a list of prompts), learned from its answers, per upstream.

An API that refuses a feature says so (a 400 naming the field); one that ignores it answers
with fewer choices than asked (OpenRouter drops n silently). Either way the upstream falls back
(K requests with n=1 in parallel, one prompt per request) rather than fail or lose samples.
But one odd answer is not proof: a server under load or a provider's failover may answer one
request short. So a feature goes off only after `strikes` misses in a row, and an upstream that
turned it off asks for it again after `recheck_after` requests without it, so a deployment that
was fixed, or a transient fault, does not cost K calls per request for the rest of the process.
A configured answer (`known`) is never second-guessed.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.types import sample_seed

log = logging.getLogger("w2s.upstream")
R = TypeVar("R")


class Capability:
    """Whether to ask for a feature now. `hit()` after an answer that honoured it, `miss()` after
    one that refused or ignored it; `refused()` for an explicit refusal (one is enough)."""

    def __init__(self, name: str, upstream: str, *, known: bool | None = None, strikes: int = 2,
                 recheck_after: int = 200) -> None:
        self.name, self.upstream, self.known = name, upstream, known
        self.strikes, self.recheck_after = strikes, recheck_after
        self._misses = 0
        self._off_for = 0  # requests sent without the feature since it went off
        self.off = known is False

    def use(self) -> bool:
        """Ask for the feature in this request? Counts the requests sent without it."""
        if self.known is not None:
            return self.known
        if not self.off:
            return True
        self._off_for += 1
        if self._off_for > self.recheck_after:
            log.info("upstream %s: asking for %s again after %d requests without it",
                     self.upstream, self.name, self.recheck_after)
            self.off, self._off_for, self._misses = False, 0, self.strikes - 1  # one more miss turns it off again
            return True
        return False

    def hit(self) -> None:
        self._misses = 0

    def miss(self, why: str) -> None:
        if self.known is not None or self.off:
            return
        self._misses += 1
        if self._misses >= self.strikes:
            log.info("upstream %s %s; sending requests without %s (asking again after %d requests)",
                     self.upstream, why, self.name, self.recheck_after)
            self.off, self._off_for = True, 0

    def refused(self, why: str) -> None:
        """An explicit refusal (a 400 about the feature): off at once."""
        if self.known is None and not self.off:
            self._misses = self.strikes - 1
            self.miss(why)

    @property
    def on(self) -> bool:
        """Without counting: is the feature on now?"""
        return self.known if self.known is not None else not self.off


async def n_choices(n: int, seed: int | None, n_cap: Capability, ask: Callable[[int, int | None], Awaitable[R]],
                    count: Callable[[R], int], refuses_n: Callable[[Exception], bool], *,
                    stagger: bool = False) -> list[R]:
    """Answers whose choices add up to `n`: one request for all n where the upstream honours n
    (`ask(n, seed)`), the missing ones as parallel requests for one each, sample i seeded as
    `proxy.types.sample_seed` says: the seed it has in a full answer on our own servers
    (`choice_seed`), so a short answer completed is the full one. With `stagger` (the
    upstream's `stagger_twins`), the first of those requests goes alone and the rest once it
    has answered. Every answer is returned, so what each billed is counted."""
    answers: list[R] = []
    if n > 1 and n_cap.use():
        try:
            answers.append(await ask(n, seed))
        except Exception as e:
            if not refuses_n(e):
                raise
            n_cap.refused(f"refused n={n}")
    answered = sum(count(a) for a in answers)
    if answers:
        if answered >= n:
            n_cap.hit()
        else:
            n_cap.miss(f"answered n={n} with {answered} choices")
    rest = list(range(answered, n))
    if stagger and not answers and len(rest) > 1:  # the first writes the cache its twins then read
        answers.append(await ask(1, sample_seed(seed, rest.pop(0))))
    answers.extend(await asyncio.gather(*(ask(1, sample_seed(seed, i)) for i in rest)))
    return answers
