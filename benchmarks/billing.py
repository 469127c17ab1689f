"""What a search's exact requests would cost at a provider: its published prices, whether it
takes `n` (one prompt billed for K samples) or bills K parallel requests, and its prompt-cache
rule (proxy.testing.cache_rules) applied request by request in the order they were sent.

A search is replayed from its tree (benchmarks/quality.py records it): the requests of step s
are the beams expanded at s, each asking for its children; they go out together, so a cache
entry one of them writes is readable from step s+1 on, never by its twins, unless the upstream
staggers them (`stagger_twins`: the first of a prompt's K requests, then the rest, which read
what it wrote). Token counts are
the black box's own tokenizer's (the benchmark's model stands in for each provider's: a price
list says what that model's tokens would cost there, not what that provider's model would say).

Price lists come from the shipped upstream presets (configs/upstreams/*.yaml), whose comments
give each price's source and the date it was read; the cache rule and where it is documented
are declared here, the one thing a preset does not say.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from proxy.config import AnthropicConfig, Prices, parse_upstream
from proxy.presets import load_preset
from proxy.testing.cache_rules import anthropic_cache_use, block_prefix_hit, deepseek_hit, deepseek_units
from proxy.types import Conversation
from proxy.upstreams.anthropic_cache import Breakpoints

Tokenize = Callable[[str], Sequence[int]]
CacheRule = Literal["none", "deepseek", "anthropic", "vllm"]


@dataclass(frozen=True)
class Request:
    """Samples of one prompt asked for at one step: the conversation's prompt plus `prefix`."""

    step: int
    prefix: str
    outputs: tuple[str, ...]


def tree_requests(tree: Sequence[Sequence[object]]) -> list[Request]:
    """The requests a search made, from its tree: [parent, step, chunk] per node, node 0 the root.
    The children of one parent at one step came from one request, in the order it returned them."""
    texts: list[str] = []
    groups: dict[tuple[int, int], list[str]] = {}
    for parent, step, chunk in tree:
        assert isinstance(chunk, str) and isinstance(step, int)
        texts.append(chunk if parent is None else texts[int(parent)] + chunk)  # type: ignore[call-overload]
        if parent is not None:
            groups.setdefault((step, int(parent)), []).append(chunk)  # type: ignore[call-overload]
    return [Request(step, texts[p], tuple(outs)) for (step, p), outs in sorted(groups.items())]


def sample_requests(outputs: Iterable[str]) -> list[Request]:
    """Best-of-N: N samples of the prompt, asked for at once."""
    return [Request(1, "", tuple(outputs))]


@dataclass(frozen=True)
class PriceList:
    """A provider's way of billing, read from a shipped upstream preset."""

    name: str
    preset: str
    cache: CacheRule
    rule_source: str
    """Where the cache rule is documented (the prices' source is in the preset's comments)."""
    block_size: int = 16
    overrides: tuple[tuple[str, object], ...] = ()
    """Preset fields replaced (e.g. a smaller cache minimum in a test, `stagger_twins`)."""

    def upstream(self) -> object:
        """The preset's config, read once per (preset, overrides): `bill` asks for it per search."""
        return _preset_upstream(self.preset, self.overrides)

    @property
    def prices(self) -> Prices:
        return self.upstream().prices  # type: ignore[attr-defined, no-any-return]

    @property
    def staggered(self) -> bool:
        """K requests of one prompt go one, then the rest, which read what the first wrote."""
        return bool(getattr(self.upstream(), "stagger_twins", False))

    @property
    def takes_n(self) -> bool:
        """One request bills its prompt once for all K samples; otherwise K requests each bill it."""
        cfg = self.upstream()
        return not isinstance(cfg, AnthropicConfig) and getattr(cfg, "supports_n", None) is not False


@lru_cache(maxsize=None)
def _preset_upstream(preset: str, overrides: tuple[tuple[str, object], ...]) -> object:
    return parse_upstream(load_preset("upstream", preset) | dict(overrides))


PRICE_LISTS: dict[str, PriceList] = {p.name: p for p in (
    PriceList("together (flat)", "together-llama-3.3-70b", "none", "no cached-input price or count (Together's "
              "pricing page)"),
    PriceList("deepseek", "deepseek", "deepseek", "api-docs.deepseek.com/guides/kv_cache (units at the end of "
              "each request's input and output, hit only on a whole unit)"),
    PriceList("anthropic haiku 4.5", "anthropic-haiku-4.5", "anthropic", "platform.claude.com prompt caching "
              "(breakpoints, block boundaries, minimum 4,096 tokens for Haiku 4.5)"),
    PriceList("deepseek, staggered", "deepseek", "deepseek", "as deepseek; the K requests of a prompt sent "
              "one, then the rest (upstream.stagger_twins)", overrides=(("stagger_twins", True),)),
    PriceList("anthropic haiku 4.5, staggered", "anthropic-haiku-4.5", "anthropic", "as anthropic haiku 4.5; "
              "the K requests of a prompt sent one, then the rest (upstream.stagger_twins)",
              overrides=(("stagger_twins", True),)),
)}
"""The price lists the quality benchmark reports; a name is a column of its table."""


@dataclass
class Bill:
    """Billed tokens by kind (summed over requests) and the number of API requests."""

    prompt: int = 0
    """Uncached prompt tokens."""
    cached: int = 0
    written: int = 0
    completion: int = 0
    requests: int = 0

    def dollars(self, prices: Prices) -> float:
        cached = prices.prompt if prices.cached_prompt is None else prices.cached_prompt
        write = prices.prompt if prices.cache_write is None else prices.cache_write
        return (self.prompt * prices.prompt + self.cached * cached + self.written * write
                + self.completion * prices.completion) / 1e6

    @property
    def prompt_total(self) -> int:
        return self.prompt + self.cached + self.written


@dataclass
class _Cache:
    """What a provider's cache holds for one search (entries usable from the next step on)."""

    units: set[tuple[int, ...]] = field(default_factory=set)
    seen: list[Sequence[int]] = field(default_factory=list)
    prefixes: set[str] = field(default_factory=set)


def bill(instruction: str, requests: Sequence[Request], price_list: PriceList, tokenize: Tokenize,
         system: str = "") -> Bill:
    """The bill for one search's `requests` (the prompt is `system + instruction + prefix`, the
    benchmark's raw template), its cache empty at the start."""
    cfg = price_list.upstream()
    n_once = price_list.takes_n
    out = Bill()
    cache, pending = _Cache(), _Cache()
    anthropic = isinstance(cfg, AnthropicConfig) and price_list.cache == "anthropic"
    marks = Breakpoints(cfg) if anthropic else None  # type: ignore[arg-type]
    wrote: list[str] = []
    conversation = Conversation.instruction(instruction)
    step = None
    for req in sorted(requests, key=lambda r: r.step):
        if req.step != step:  # a new step: what the last one wrote is readable now
            _settle(cache, pending, marks, conversation, wrote)
            step = req.step
        text = system + instruction + req.prefix
        ids = tokenize(text)
        calls = [req.outputs] if n_once else [(o,) for o in req.outputs]
        stagger = price_list.staggered and len(calls) > 1
        bodies = _anthropic_bodies(marks, conversation, system, instruction, req.prefix, len(calls), wrote,
                                   stagger) if marks is not None else None
        readable = cache
        for i, outs in enumerate(calls):
            added = _Cache()
            out.requests += 1
            out.completion += sum(len(tokenize(o)) for o in outs)
            if price_list.cache == "deepseek":
                hit = deepseek_hit(ids, readable.units)
                for o in outs:
                    added.units.update(deepseek_units(ids, tokenize(text + o)))
                out.cached += hit
                out.prompt += len(ids) - hit
            elif price_list.cache == "vllm":
                hit = block_prefix_hit(ids, readable.seen, price_list.block_size)
                added.seen.extend([ids] + [tokenize(text + o) for o in outs])
                out.cached += hit
                out.prompt += len(ids) - hit
            elif bodies is not None:
                blocks, flags = bodies[i]
                use = anthropic_cache_use(blocks, flags, readable.prefixes, lambda t: len(tokenize(t)),
                                          cfg.cache_min_tokens, sep="")  # type: ignore[attr-defined]
                added.prefixes.update(use.cached)
                out.cached += use.read
                out.written += use.write
                out.prompt += len(ids) - use.read - use.write
            else:
                out.prompt += len(ids)
            pending.units |= added.units
            pending.seen += added.seen
            pending.prefixes |= added.prefixes
            if stagger and i == 0:  # the twins come once the first has answered: its entry is there
                readable = _merged(cache, added)
    return out


def _merged(cache: _Cache, more: _Cache) -> _Cache:
    """A copy of `cache` holding `more` too (what one request wrote, for its staggered twins only)."""
    return _Cache(cache.units | more.units, cache.seen + more.seen, cache.prefixes | more.prefixes)


def _settle(cache: _Cache, pending: _Cache, marks: Breakpoints | None, conversation: Conversation,
            wrote: list[str]) -> None:
    cache.units |= pending.units
    cache.seen += pending.seen
    cache.prefixes |= pending.prefixes
    pending.units, pending.seen, pending.prefixes = set(), [], set()
    if marks is not None:
        for prefill in wrote:
            marks.wrote(conversation, prefill)
    wrote.clear()


def _anthropic_bodies(marks: Breakpoints, conversation: Conversation, system: str, instruction: str, prefix: str,
                      calls: int, wrote: list[str], stagger: bool = False) -> list[tuple[list[str], list[bool]]]:
    """Each of the `calls` parallel requests' text blocks and breakpoint flags, as the Anthropic
    family places them (the first request writes, its twins do not; staggered, they carry its
    marks and read what it wrote)."""
    messages = [{"role": "user", "content": instruction}] + ([{"role": "assistant", "content": prefix}] if prefix else [])
    writer, twins, prefill = marks.bodies(conversation, system, messages)
    if prefill is not None:
        wrote.append(prefill)

    def flat(msgs: list[dict[str, object]]) -> tuple[list[str], list[bool]]:
        blocks, flags = ([system], [False]) if system else ([], [])
        for m in msgs:
            content = m["content"]
            for b in ([{"type": "text", "text": content}] if isinstance(content, str) else content):  # type: ignore[union-attr]
                blocks.append(b["text"])
                flags.append("cache_control" in b)
        return blocks, flags

    return [flat(writer if i == 0 or stagger else twins) for i in range(calls)]
