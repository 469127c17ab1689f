"""benchmarks/billing.py and proxy.testing.cache_rules: a search's exact requests priced under
each provider's documented rules, checked against sums worked by hand (one token a character)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.billing import PRICE_LISTS, Bill, PriceList, Request, bill, sample_requests, tree_requests  # noqa: E402
from proxy.config import Prices  # noqa: E402
from proxy.testing.cache_rules import block_prefix_hit, deepseek_hit, deepseek_units  # noqa: E402


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


TREE = [[None, 0, ""], [0, 1, "ab"], [0, 1, "cd"], [1, 2, "e"], [1, 2, "f"], [2, 2, "g"]]


def test_requests_follow_from_the_tree() -> None:
    assert tree_requests(TREE) == [Request(1, "", ("ab", "cd")), Request(2, "ab", ("e", "f")),
                                   Request(2, "cd", ("g",))]
    assert sample_requests(["a", "b"]) == [Request(1, "", ("a", "b"))]


def test_flat_prices_bill_each_prompt_once_per_request() -> None:
    b = bill("xyz", tree_requests(TREE), PRICE_LISTS["together (flat)"], chars)
    # prompts "xyz", "xyzab", "xyzcd": 3 + 5 + 5; completions 2 + 2 + 1 + 1 + 1
    assert (b.prompt, b.cached, b.written, b.completion, b.requests) == (13, 0, 0, 7, 3)
    assert b.dollars(Prices(prompt=0.88, completion=0.88)) == pytest.approx(20 * 0.88 / 1e6)


def test_deepseek_reads_whole_units_left_by_earlier_steps_only() -> None:
    b = bill("xyz", tree_requests(TREE), PRICE_LISTS["deepseek"], chars)
    # no n: five requests. Step 1: two "xyz", both miss (twins never read each other). Step 2:
    # "xyzab" twice and "xyzcd" once, each the whole unit a step-1 request left at its output's end.
    assert (b.prompt, b.cached, b.completion, b.requests) == (6, 15, 7, 5)
    prices = PRICE_LISTS["deepseek"].prices
    assert b.dollars(prices) == pytest.approx((6 * prices.prompt + 15 * prices.cached_prompt
                                               + 7 * prices.completion) / 1e6)


def test_deepseek_unit_matched_in_part_is_a_miss() -> None:
    units = set(deepseek_units(chars("xyz"), chars("xyzab")))
    assert deepseek_hit(chars("xyzabq"), units) == 5
    assert deepseek_hit(chars("xyza"), units) == 3  # "xyzab" only in part: the input unit is what hits
    assert deepseek_hit(chars("xy"), units) == 0


def test_vllm_reads_whole_blocks_and_never_the_whole_prompt() -> None:
    seen = [list(range(37)) + [99]]
    assert block_prefix_hit(list(range(40)), seen, 16) == 32
    assert block_prefix_hit(list(range(32)), [list(range(32))], 16) == 16  # 31 computable at most
    assert block_prefix_hit([], seen, 16) == 0


def test_anthropic_breakpoints_write_once_a_beam_and_read_the_parent() -> None:
    haiku = PriceList("haiku, no minimum", "anthropic-haiku-4.5", "anthropic", "test",
                      overrides=(("cache_min_tokens", 0),))
    requests = [Request(1, "", ("o", "p")), Request(2, "ab", ("q", "r"))]
    b = bill("x" * 10, requests, haiku, chars)
    # Step 1: the writer marks the conversation (writes 10), its twin marks nothing (pays 10).
    # Step 2: the writer reads the conversation (10) and writes the prefill "ab" (2); its twin
    # reads the conversation and pays the 2 after it.
    assert (b.prompt, b.cached, b.written, b.requests) == (12, 20, 12, 4)


def test_anthropic_minimum_caches_nothing_shorter() -> None:
    b = bill("x" * 10, [Request(1, "", ("o", "p")), Request(2, "ab", ("q", "r"))],
             PRICE_LISTS["anthropic haiku 4.5"], chars)
    assert (b.prompt, b.cached, b.written) == (2 * 10 + 2 * 12, 0, 0)


def test_staggered_twins_read_what_the_first_of_them_wrote() -> None:
    deepseek = bill("xyz", tree_requests(TREE), PRICE_LISTS["deepseek, staggered"], chars)
    # Step 1: the first "xyz" misses (3) and leaves its input unit; its twin, sent after, reads it
    # (3). Step 2 as without staggering: 5 + 5 + 5 read. The other beams' twins see nothing new.
    assert (deepseek.prompt, deepseek.cached, deepseek.completion, deepseek.requests) == (3, 18, 7, 5)
    haiku = PriceList("haiku, no minimum, staggered", "anthropic-haiku-4.5", "anthropic", "test",
                      overrides=(("cache_min_tokens", 0), ("stagger_twins", True)))
    b = bill("x" * 10, [Request(1, "", ("o", "p")), Request(2, "ab", ("q", "r"))], haiku, chars)
    # Step 1: the writer writes 10, its twin carries the same mark and reads them. Step 2: the
    # writer reads 10 and writes "ab"; its twin reads all 12. Nothing is paid in full.
    assert (b.prompt, b.cached, b.written, b.requests) == (0, 32, 12, 4)
    assert PRICE_LISTS["anthropic haiku 4.5, staggered"].staggered and not PRICE_LISTS["deepseek"].staggered


def test_unset_cache_rates_cost_the_prompt_rate() -> None:
    assert Bill(prompt=1, cached=2, written=3).dollars(Prices(prompt=1.0)) == pytest.approx(6 / 1e6)


def test_price_lists_come_from_presets_with_sources() -> None:
    for p in PRICE_LISTS.values():
        assert p.prices.prompt > 0 and p.prices.completion > 0 and p.rule_source
    assert not PRICE_LISTS["deepseek"].takes_n and not PRICE_LISTS["anthropic haiku 4.5"].takes_n
    assert PRICE_LISTS["together (flat)"].takes_n
    assert PRICE_LISTS["anthropic haiku 4.5"].prices == Prices(prompt=1.0, completion=5.0, cached_prompt=0.1,
                                                                cache_write=1.25)
