"""What the incremental scorer remembers between calls, and the process-wide bound on it.

A `Prefix` is a token sequence whose attention keys/values, per-token log-probabilities and
next-token distribution are known. Its KV cache is a chain of `Segment`s shared with the
prefix it was extended from: the prompt's segment is held once and referenced by every beam,
a candidate adds only its new tokens, and a candidate re-tokenized differently at the seam
references its parent's chain cut to the common tokens. A segment lives exactly as long as
some prefix's chain references it, so freeing a loser frees only what no survivor shares.

`SideCache` holds one model's prefixes for one session, `SessionCache` both sides plus the
bookkeeping that decides which prefixes are still worth keeping, and `CachePool` counts every
live segment's tokens and, when a bound is reached, makes the least recently used sessions
drop their caches (they recompute on next use; the numbers do not change).

Everything here is touched only from the scorer's worker thread, except the token counter,
whose decrement can run wherever the last reference to a segment dies (so it has a lock).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch


class Segment:
    """Keys and values of a run of consecutive tokens for every layer: [layers, 2, heads, n, head_dim]."""

    __slots__ = ("kv", "__weakref__")

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv

    @property
    def n(self) -> int:
        return int(self.kv.shape[3])


Chain = tuple[tuple[Segment, int], ...]
"""(segment, tokens used from its start), in order; covers the first sum(used) tokens."""


def chain_len(chain: Chain) -> int:
    return sum(used for _, used in chain)


def cut_chain(chain: Chain, n: int) -> Chain:
    """The chain covering only the first `n` tokens (segments past them are not referenced)."""
    out: list[tuple[Segment, int]] = []
    left = n
    for seg, used in chain:
        if left <= 0:
            break
        take = min(used, left)
        out.append((seg, take))
        left -= take
    if left > 0:
        raise ValueError(f"chain of {chain_len(chain)} tokens cannot cover {n}")
    return tuple(out)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass(eq=False)
class Prefix:
    """A token sequence (prompt + response so far, no EOS) with everything needed to extend it."""

    ids: np.ndarray
    chain: Chain
    logp: torch.Tensor
    """float64 on CPU, one per token: logp[i] = log p(ids[i] | ids[:i]); logp[0] = 0 (never scored)."""
    next_logp: torch.Tensor
    """float32 on the model's device: log-probabilities of the token after `ids` (EOS included)."""
    gen: int
    """Search generation of the text it was made for; old generations are dropped (see SessionCache)."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def key(self) -> bytes:
        return key_of(self.ids)


def key_of(ids: np.ndarray) -> bytes:
    return ids.astype(np.int64, copy=False).tobytes()


class SideCache:
    """One model's prefixes for one session, keyed by their token ids."""

    def __init__(self) -> None:
        self.prefixes: dict[bytes, Prefix] = {}

    def get(self, ids: np.ndarray) -> Prefix | None:
        return self.prefixes.get(key_of(ids))

    def best(self, ids: np.ndarray) -> tuple[Prefix | None, int]:
        """The prefix that leaves the least to run for `ids`, and how many tokens they share.

        Reuse is `shared` tokens when the prefix is wholly shared (its next-token distribution
        predicts the first new token), else `shared - 1` (the last shared token is run again
        to predict the first differing one); ties go to the shorter chain.
        """
        best: Prefix | None = None
        best_shared, best_reuse = 0, -1
        for p in self.prefixes.values():
            shared = common_prefix(p.ids, ids)
            reuse = shared if shared == len(p) else shared - 1
            if reuse > best_reuse or (reuse == best_reuse and best is not None and len(p.chain) < len(best.chain)):
                best, best_shared, best_reuse = p, shared, reuse
        if best is None or best_shared == 0:
            return None, 0
        return best, best_shared

    def add(self, prefix: Prefix) -> None:
        old = self.prefixes.get(prefix.key)
        if old is not None:
            prefix.gen = max(prefix.gen, old.gen)
        self.prefixes[prefix.key] = prefix

    def retain(self, keep: Iterable[bytes] | None = None, *, min_gen: int | None = None) -> None:
        """Drop every prefix not in `keep` (when given) or older than `min_gen` (when given)."""
        wanted = set(keep) if keep is not None else None
        self.prefixes = {
            k: p
            for k, p in self.prefixes.items()
            if (wanted is None or k in wanted) and (min_gen is None or p.gen >= min_gen)
        }

    def clear(self) -> None:
        self.prefixes = {}

    def held_tokens(self) -> int:
        """Tokens of the distinct segments these prefixes keep alive (segments are shared)."""
        seen: dict[int, int] = {}
        for p in self.prefixes.values():
            for seg, _ in p.chain:
                seen[id(seg)] = seg.n
        return sum(seen.values())


@dataclass(eq=False)
class SessionCache:
    """Both sides' prefixes for one session, plus which texts were scored in which generation.

    Generations follow the search without being told about it: a text extending an earlier
    scored text is one generation later. When generation g appears, the parents being extended
    are g-1 and everything older is no longer needed (a beam search never goes back), so it is
    dropped; `keep` does better when the caller says which texts survived.
    """

    sides: tuple[SideCache, ...] = field(default_factory=lambda: (SideCache(), SideCache()))
    prompts: tuple | None = None
    """Per-side prompt encodings, made on the worker on first use."""
    closed: bool = False
    _gens: dict[str, int] = field(default_factory=dict)
    _keys: dict[str, tuple[bytes, ...]] = field(default_factory=dict)

    def generation(self, text: str) -> int:
        if text in self._gens:
            return self._gens[text]
        parent = max((g for t, g in self._gens.items() if text.startswith(t)), default=0)
        return parent + 1

    def note(self, text: str, gen: int, keys: tuple[bytes, ...]) -> None:
        self._gens[text] = gen
        self._keys[text] = keys

    def prune_generations(self) -> None:
        if not self._gens:
            return
        min_gen = max(self._gens.values()) - 1
        self._gens = {t: g for t, g in self._gens.items() if g >= min_gen}
        self._keys = {t: k for t, k in self._keys.items() if t in self._gens}
        for side in self.sides:
            side.retain(min_gen=min_gen)

    def keep(self, texts: Iterable[str]) -> None:
        """Keep only the prefixes of these texts (the survivors); free everything else now."""
        wanted = [t for t in texts if t in self._keys]
        for i, side in enumerate(self.sides):
            side.retain({self._keys[t][i] for t in wanted})
        self._gens = {t: self._gens[t] for t in wanted}
        self._keys = {t: self._keys[t] for t in wanted}

    def drop(self) -> None:
        """Forget every cached tensor; texts and generations stay (they cost nothing)."""
        for side in self.sides:
            side.clear()

    def release(self) -> None:
        self.drop()
        self._gens.clear()
        self._keys.clear()
        self.prompts = None

    def held_tokens(self) -> int:
        return sum(side.held_tokens() for side in self.sides)

    def has_cache(self) -> bool:
        return any(side.prefixes for side in self.sides)


@dataclass(frozen=True)
class CacheStats:
    tokens: int
    """Token positions held in live KV segments, both models together."""
    segments: int
    sessions: int
    """Sessions that hold any cached prefix."""
    evictions: int
    max_tokens: int | None


class CachePool:
    """Counts live KV segments and keeps their tokens under `max_tokens` by LRU session eviction."""

    def __init__(self, max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_cached_tokens must be at least 1")
        self.max_tokens = max_tokens
        self.evictions = 0
        self._lock = threading.Lock()
        self._tokens = 0
        self._segments = 0
        self._lru: OrderedDict[int, weakref.ref[SessionCache]] = OrderedDict()

    @property
    def tokens(self) -> int:
        return self._tokens

    def segment(self, kv: torch.Tensor) -> Segment:
        """Wrap new KV in a counted segment; the count drops when the last reference goes."""
        seg = Segment(kv)
        n = seg.n
        with self._lock:
            self._tokens += n
            self._segments += 1
        weakref.finalize(seg, self._freed, n)
        return seg

    def _freed(self, n: int) -> None:
        with self._lock:
            self._tokens -= n
            self._segments -= 1

    def touch(self, cache: SessionCache) -> None:
        key = id(cache)
        self._lru.pop(key, None)
        self._lru[key] = weakref.ref(cache)

    def forget(self, cache: SessionCache) -> None:
        self._lru.pop(id(cache), None)

    def evict(self, *, need: int = 0, protect: Iterable[SessionCache] = ()) -> None:
        """Drop least recently used sessions' caches until `need` more tokens fit under the bound.

        Protected sessions (those of the batch about to run, whose planned rows reference their
        chains anyway) are skipped; after the batch, a call without protection restores the bound.
        """
        if self.max_tokens is None:
            return
        protected = {id(c) for c in protect}
        for key in list(self._lru):
            if self._tokens + need <= self.max_tokens:
                return
            cache = self._lru[key]()
            if cache is None:
                del self._lru[key]
            elif key not in protected and cache.has_cache():
                cache.drop()
                self.evictions += 1

    def drop_all(self) -> None:
        """Every session's caches, when the scorer closes (its sessions may outlive it)."""
        for ref in list(self._lru.values()):
            cache = ref()
            if cache is not None:
                cache.drop()
        self._lru.clear()

    def stats(self) -> CacheStats:
        live = [c for c in (ref() for ref in self._lru.values()) if c is not None and c.has_cache()]
        return CacheStats(self._tokens, self._segments, len(live), self.evictions, self.max_tokens)
