"""The on-disk cache of answers to seeded requests: a rerun of a seeded evaluation pays nothing
twice, unseeded requests are never answered from disk, and a broken entry is asked again."""
from __future__ import annotations

from pathlib import Path

from proxy.config import AppConfig, SearchConfig
from proxy.engine import Engine
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.types import Conversation
from proxy.upstreams.cache import CachedUpstream
from tests.conftest import upstream_config
from tests.doubles import FnScorer


def score(text: str, finished: bool) -> float:
    return float(len(set(text.split())))


async def test_a_seeded_rerun_is_answered_from_disk_and_bills_nothing(tmp_path: Path) -> None:
    cbs = SearchConfig(w=2, k=2, l=4, max_new_tokens=16, temperature=1.0, seed=11)
    question = Conversation.instruction("Tell me about the cat.")
    async with ToyCompletionsServer() as server:
        cfg = AppConfig(upstream=upstream_config(server, response_cache_dir=str(tmp_path / "cache")))
        async with Engine(cfg, scorer=FnScorer(score)) as first:
            assert isinstance(first.upstream, CachedUpstream)
            a = await first.search(question, cbs)
        sent = len(server.requests)
        async with Engine(cfg, scorer=FnScorer(score)) as second:  # another process, the same directory
            b = await second.search(question, cbs)
            unseeded = await second.search(question, cbs.model_copy(update={"seed": None}))
            assert second.upstream.hits == len(b.steps) and second.upstream.usage == unseeded.usage
        after_unseeded = len(server.requests)
        for entry in (tmp_path / "cache").rglob("*.json"):  # a damaged cache is asked again
            entry.write_text("{not json")
        async with Engine(cfg, scorer=FnScorer(score)) as third:
            c = await third.search(question, cbs)
    assert sent > 0 and a.usage.total_tokens > 0
    assert (b.text, b.score, b.tokens) == (a.text, a.score, a.tokens) and b.usage.total_tokens == 0 and b.calls == 0
    assert after_unseeded > sent and unseeded.usage.total_tokens > 0  # unseeded: always asked
    assert c.text == a.text and len(server.requests) == after_unseeded + sent  # all asked again, the same
