"""The incremental scorer against the full-recompute path, on tiny models in fp32 with eager attention.

The full-recompute path is itself checked token by token against an independent slow reference
in test_implicit_scorer.py; here the incremental path must give its numbers (within 1e-4) while
running far fewer tokens, across random chunkings, seams that re-tokenize, finished/unfinished
mixes, sessions batched together, and after its caches were evicted. Token counts are checked
against what the tokenizers alone say must be run.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from tiny_models import Loaded

from proxy.config import ModelSpec, ScorerConfig
from scorers.batcher import MicroBatcher
from scorers.implicit import ImplicitRewardScorer
from scorers.kv_cache import CachePool, Prefix, SessionCache, chain_len

TOL = 1e-4

STORY = (
    "Once upon a time, a small fox lived at the edge of a forest.  Every morning it walked to the river\n\n"
    "to drink — café, naïve, 日本語, 🙂 and 👩\u200d💻; e\u0301 3.14159 #tags @home 100%!\tThe end."
)


def _pairs(request: pytest.FixtureRequest, name: str) -> tuple[Loaded, Loaded]:
    return request.getfixturevalue(name)


def _close(got: Sequence[float], want: Sequence[float]) -> None:
    assert len(got) == len(want)
    assert max((abs(g - w) for g, w in zip(got, want)), default=0.0) < TOL, (got, want)


def _ids(loaded: Loaded, prompt_text: str, text: str) -> list[int]:
    """Token ids the way the scorer must see prompt + text (independent of the scorer's code)."""
    tok = loaded[1]
    add_special = not prompt_text.startswith(tok.bos_token)
    return tok(prompt_text + text, add_special_tokens=add_special)["input_ids"]


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("pair_name", ["llama_pair", "mixed_pair"])
async def test_random_chunkings_match_full_recompute(request, pair_name):
    """A CBS-shaped run (W=2, K=3) whose chunks end at random characters: mid-word, on
    whitespace, between a letter and its combining accent, inside an emoji ZWJ sequence."""
    pair = _pairs(request, pair_name)
    inc = ImplicitRewardScorer.from_loaded(*pair, batch_size=16)
    full = ImplicitRewardScorer.from_loaded(*pair, incremental=False, batch_size=16)
    rng = random.Random(7)
    prompt = [{"role": "user", "content": "Tell me a story with a few unusual characters."}]
    with inc.open(prompt) as si, full.open(prompt) as sf:
        beams = [""]
        steps = 0
        while beams:
            steps += 1
            texts = []
            for b in beams:
                for k in range(3):
                    cut = len(b) + rng.randint(1, 9)
                    texts.append(STORY[:cut] if k == 0 else b + STORY[len(b):cut][::-1])
            finished = [k % 3 > 0 and rng.random() < 0.3 for k in range(len(texts))]
            got = await asyncio.gather(*(si.score(texts[i:i + 3], finished[i:i + 3]) for i in range(0, len(texts), 3)))
            want = await sf.score(texts, finished)
            _close([x for g in got for x in g], want)
            on_story = [t for t in texts[::3] if t != STORY]
            others = [t for k, (t, f) in enumerate(zip(texts, finished)) if k % 3 and not f]
            beams = on_story[:1] + rng.sample(others, min(1, len(others))) if on_story else []
    assert steps > 15
    stats = inc.engine_stats
    assert stats.rollbacks > 0  # some seams really re-tokenized
    for side in (0, 1):  # the same numbers for a fraction of the work
        assert inc.tokens_run[side] * 5 < full.tokens_run[side]
    await inc.aclose()
    await full.aclose()


SEAMS = [
    ("The small fox walked to th", "e river"),  # mid-word
    ("The small fox walked to", " the river"),  # clean word boundary
    ("The small fox ", " walked  to\n\n the river"),  # on whitespace, runs of whitespace
    ("Numbers like 3.14", "159 and 2024"),  # inside a number
    ("caf", "é au lait"),  # before a multi-byte character
    ("cafe", "\u0301 au lait"),  # between a letter and its combining accent
    ("I code 👩", "\u200d💻 daily"),  # inside an emoji ZWJ sequence
]


@pytest.mark.parametrize("pair_name", ["llama_pair", "mixed_pair"])
async def test_seams_roll_back_exactly_as_far_as_the_tokens_changed(request, pair_name):
    """Each child is scored after its parent in one session. The tokens run for the child must
    be exactly what the tokenizer says differs, plus one rerun token when the parent's last
    tokens were re-cut (then the cache rolls back to the common prefix)."""
    pair = _pairs(request, pair_name)
    raw = {"chat_template": "raw", "system_prompt": None}
    pair = tuple((m, t, s.model_copy(update=raw)) for m, t, s in pair)
    prompt = "A story: "
    changed_any = False
    for parent, chunk in SEAMS:
        child = parent + chunk
        inc = ImplicitRewardScorer.from_loaded(*pair)
        full = ImplicitRewardScorer.from_loaded(*pair, incremental=False)
        with inc.open(prompt) as si, full.open(prompt) as sf:
            _close(await si.score([parent], [False]), await sf.score([parent], [False]))
            before, rollbacks = inc.tokens_run, inc.engine_stats.rollbacks
            _close(await si.score([child, child], [False, True]), await sf.score([child, child], [False, True]))
        expected_rollbacks = 0
        for side, loaded in enumerate(pair):
            p_ids, c_ids = _ids(loaded, prompt, parent), _ids(loaded, prompt, child)
            common = _lcp(p_ids, c_ids)
            rerun_from = len(p_ids) if common == len(p_ids) else common - 1
            expected_rollbacks += int(common < len(p_ids))
            # The finished copy reuses the same prefix: EOS is scored from its next-token row.
            assert inc.tokens_run[side] - before[side] == len(c_ids) - rerun_from, (parent, chunk, side)
        assert inc.engine_stats.rollbacks - rollbacks == expected_rollbacks
        changed_any |= expected_rollbacks > 0
        await inc.aclose()
        await full.aclose()
    assert changed_any


async def test_first_call_runs_the_prompt_once(llama_pair):
    """K candidates of a new session: the prompt runs once (a shared first-phase row), then
    each candidate runs only its own tokens."""
    inc = ImplicitRewardScorer.from_loaded(*llama_pair)
    full = ImplicitRewardScorer.from_loaded(*llama_pair, incremental=False)
    texts = [" Red leaves drift", " The sea and the wind", " Apples, oranges and pears"]
    with inc.open("Write a poem.") as si, full.open("Write a poem.") as sf:
        _close(await si.score(texts, [False] * 3), await sf.score(texts, [False] * 3))
        prompt_text = si.prompt_texts[0]
    for side, loaded in enumerate(llama_pair):
        ids = [_ids(loaded, prompt_text, t) for t in texts]
        shared = min(_lcp(ids[0], other) for other in ids[1:])
        assert inc.tokens_run[side] == shared + sum(len(i) - shared for i in ids)
        assert full.tokens_run[side] == sum(len(i) for i in ids)
    assert inc.engine_stats.shared_rows == 2
    await inc.aclose()
    await full.aclose()


async def test_finished_unfinished_mix_and_rescoring(mixed_pair):
    inc = ImplicitRewardScorer.from_loaded(*mixed_pair)
    full = ImplicitRewardScorer.from_loaded(*mixed_pair, incremental=False)
    texts = ["", "", "Red leaves", "Red leaves", "Red leaves drift and fall", "🙂"]
    finished = [False, True, False, True, True, False]
    with inc.open("Hi") as si, full.open("Hi") as sf:
        first = await si.score(texts, finished)
        _close(first, await sf.score(texts, finished))
        assert first[0] == 0.0
        work = inc.tokens_run
        again = await si.score(list(reversed(texts)), list(reversed(finished)))
        assert again == list(reversed(first))  # everything cached: same floats, no token run
        assert inc.tokens_run == work
    await inc.aclose()
    await full.aclose()


# ---------------------------------------------------------------- batching across sessions


async def test_interleaved_sessions_share_forward_passes(llama_pair):
    """Four searches step in lockstep; each step's calls (one per beam per session) land in one
    job, and after the first step each model runs one forward pass per step for all of them."""
    inc = ImplicitRewardScorer.from_loaded(*llama_pair, batch_size=64, batch_wait_ms=50)
    full = ImplicitRewardScorer.from_loaded(*llama_pair, incremental=False)
    prompts = ["Tell me a story.", "Write a haiku.", [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Name three fruits."}], "Describe the sea."]
    inc_s = [inc.open(p) for p in prompts]
    full_s = [full.open(p) for p in prompts]
    beams: list[list[str]] = [[""] for _ in prompts]
    rng = random.Random(3)
    for step in range(5):
        calls = []
        for i in range(len(prompts)):
            for b in beams[i]:
                calls.append((i, [b + f" {w}" for w in rng.sample(STORY.split(), 3)]))
        jobs, forwards = inc.batch_jobs, inc.forward_calls
        got = await asyncio.gather(*(inc_s[i].score(t, [False] * 3) for i, t in calls))
        assert inc.batch_jobs - jobs == 1
        if step > 0:
            assert inc.forward_calls - forwards == 2  # one per model for every session's candidates
        for (i, t), g in zip(calls, got):
            _close(g, await full_s[i].score(t, [False] * 3))
        for i in range(len(prompts)):
            beams[i] = [t for j, t in calls if j == i][0][:2]
    for s in inc_s + full_s:
        s.close()
    await inc.aclose()
    await full.aclose()


async def test_a_bad_request_fails_alone(llama_pair):
    """Requests gathered into one job: one whose prompt alone is too long for the model's
    positions (a response too long is scored clipped: test_guide_room.py), one for a closed
    session; the good one beside them is scored."""
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair, batch_wait_ms=500)  # a wide window: a loaded box is slow
    good, long, closed = scorer.open("Hi"), scorer.open("word " * 600), scorer.open("Hi")
    closed_call = asyncio.ensure_future(closed.score(["x"], [False]))
    await asyncio.sleep(0)  # its request is queued, waiting for company...
    closed.close()  # ...when its session closes
    results = await asyncio.gather(
        good.score(["Red leaves"], [True]), long.score(["x"], [False]), closed_call,
        return_exceptions=True,
    )
    assert scorer.batch_jobs == 1
    assert isinstance(results[0], list) and len(results[0]) == 1
    assert isinstance(results[1], ValueError) and "positions" in str(results[1])
    assert isinstance(results[2], RuntimeError) and "closed" in str(results[2])
    good.close()
    long.close()
    await scorer.aclose()


# ---------------------------------------------------------------- memory


async def test_eviction_recomputes_the_same_numbers(mixed_pair):
    bound = 120
    inc = ImplicitRewardScorer.from_loaded(*mixed_pair, max_cached_tokens=bound, batch_wait_ms=0)
    full = ImplicitRewardScorer.from_loaded(*mixed_pair, incremental=False)
    prompts = ["Tell me a story.", "Write a haiku.", "Describe the sea."]
    inc_s, full_s = [inc.open(p) for p in prompts], [full.open(p) for p in prompts]
    texts = [""] * len(prompts)
    for step in range(6):
        for i in range(len(prompts)):  # round robin: each session finds its cache evicted
            texts[i] = STORY[: 12 * (step + 1) + i]
            cands = [texts[i], texts[i] + " and", texts[i] + "!"]
            _close(await inc_s[i].score(cands, [False, False, True]), await full_s[i].score(cands, [False, False, True]))
            assert (await inc.cache_stats()).tokens <= bound
    stats = await inc.cache_stats()
    assert stats.evictions > 0
    for s in inc_s + full_s:
        s.close()
    assert (await inc.cache_stats()).tokens == 0
    await inc.aclose()
    await full.aclose()


async def test_thousand_sessions_leave_no_cache(llama_pair):
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair, batch_size=256, batch_wait_ms=0)

    async def one(i: int) -> None:
        session = scorer.open(f"Question number {i}?")
        if i % 3:
            await session.score([f" answer {i}", f" reply {i}."], [i % 2 == 0, False])
        session.close()

    for round_ in range(10):
        await asyncio.gather(*(one(100 * round_ + i) for i in range(100)))
    stats = await scorer.cache_stats()
    assert (stats.tokens, stats.segments, stats.sessions) == (0, 0, 0)
    assert scorer.tokens_run[0] > 0
    await scorer.aclose()


async def test_keep_frees_losers_at_once(llama_pair):
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair)
    texts = [" Red leaves drift", " The sea and the wind", " Apples, oranges and pears"]
    with scorer.open("Write a poem.") as session:
        await session.score(texts, [False] * 3)
        prompt_text = session.prompt_texts[0]
        ids = [[_ids(loaded, prompt_text, t) for t in texts] for loaded in llama_pair]
        shared = [min(_lcp(i[0], o) for o in i[1:]) for i in ids]
        assert (await scorer.cache_stats()).tokens == sum(s + sum(len(x) - s for x in i) for s, i in zip(shared, ids))
        session.keep([texts[1]])
        assert (await scorer.cache_stats()).tokens == sum(len(i[1]) for i in ids)
    assert (await scorer.cache_stats()).tokens == 0
    await scorer.aclose()


async def test_old_generations_are_dropped_without_keep(llama_pair):
    """A beam extended step after step: only the parents' generation and the newest stay cached."""
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair)
    with scorer.open("Tell me a story.") as session:
        beam = ""
        for step in range(8):
            cands = [beam + f" {w}{step}" for w in ("fox", "river", "sea")]
            await session.score(cands, [False] * 3)
            beam = cands[step % 3]
            held = session._cache.sides[0].prefixes.values()
            assert {p.gen for p in held} <= {step, step + 1}
            assert len(held) <= 7  # at most 3 new + 3 of the parent generation (+ the prompt's row)
    await scorer.aclose()


def test_pool_counts_segments_and_evicts_least_recent_first():
    pool = CachePool(max_tokens=10)
    caches = [SessionCache() for _ in range(3)]
    for i, cache in enumerate(caches):
        seg = pool.segment(torch.zeros(1, 2, 1, 4, 1))
        ids = np.arange(4)
        cache.sides[0].add(Prefix(ids, ((seg, 4),), torch.zeros(4, dtype=torch.float64), torch.zeros(3), 1))
        pool.touch(cache)
    assert pool.tokens == 12 and chain_len(caches[0].sides[0].prefixes[ids.tobytes()].chain) == 4
    pool.touch(caches[0])  # now the most recent
    pool.evict()
    assert [c.has_cache() for c in caches] == [True, False, True] and pool.tokens == 8
    pool.evict(need=4, protect=[caches[2]])
    assert [c.has_cache() for c in caches] == [False, False, True] and pool.tokens == 4
    assert pool.stats().evictions == 2


# ---------------------------------------------------------------- prompt contrast


async def test_prompt_contrast_pair_runs_both_prompts_in_one_pass(tiny_model_dirs):
    """One model, two system prompts: loaded once, both sides' rows share each forward pass,
    and the numbers equal a full recompute of the two conditionals."""
    model = ModelSpec(path=str(tiny_model_dirs.llama_tuned))
    cfg = ScorerConfig(
        tuned=model.model_copy(update={"system_prompt": "You are cheerful and upbeat."}),
        untuned=model.model_copy(update={"system_prompt": "You are neutral."}),
        device="cpu", dtype="float32", attn_implementation="eager",
    )
    inc = ImplicitRewardScorer.from_config(cfg)
    full = ImplicitRewardScorer.from_config(cfg.model_copy(update={"incremental": False}))
    assert inc.tuned.model is inc.untuned.model
    with inc.open("Describe rain.") as si, full.open("Describe rain.") as sf:
        assert si.prompt_texts[0] != si.prompt_texts[1]
        beam = ""
        for step in range(4):
            cands = [beam + STORY[10 * step: 10 * step + 10 + k] for k in range(3)]
            forwards = inc.forward_calls
            got = await si.score(cands, [False, True, False])
            _close(got, await sf.score(cands, [False, True, False]))
            assert all(abs(g) > 1e-3 for g in got)
            if step:
                assert inc.forward_calls - forwards == 1
            beam = cands[0]
    await inc.aclose()
    await full.aclose()


# ---------------------------------------------------------------- the micro-batcher alone


async def test_batcher_gathers_isolates_errors_and_runs_on_the_worker():
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max_workers=1)
    seen: list[tuple[list[int], int]] = []

    def run(items: list[int]) -> list[int | BaseException]:
        seen.append((items, threading.get_ident()))
        time.sleep(0.02)  # while this runs, later submits pile up
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, executor, max_items=4, wait_s=0.0)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, 2, -3, 4, 5, 6)), return_exceptions=True)
    assert results[:2] == [10, 20] and isinstance(results[2], ValueError) and results[3:] == [40, 50, 60]
    assert [items for items, _ in seen] == [[1, 2, -3, 4], [5, 6]]  # max_items per job
    assert threading.get_ident() not in {t for _, t in seen}

    # A request waits up to wait_s for company; one arriving meanwhile joins its job.
    slow: MicroBatcher[int, int] = MicroBatcher(run, executor, max_items=100, wait_s=0.2)
    seen.clear()

    async def later(i: int) -> int:
        await asyncio.sleep(0.01)
        return await slow.submit(i)

    assert await asyncio.gather(slow.submit(7), later(8)) == [70, 80]
    assert [items for items, _ in seen] == [[7, 8]]

    # A cancelled caller does not disturb the others in its job.
    first = asyncio.ensure_future(slow.submit(1))
    second = asyncio.ensure_future(slow.submit(2))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == 20
    await slow.drain()
    executor.shutdown()


def test_scorer_config_fields():
    base = dict(tuned={"path": "a"}, untuned={"path": "b"})
    cfg = ScorerConfig.model_validate(base)
    assert (cfg.incremental, cfg.max_cached_tokens, cfg.batch_wait_ms, cfg.expo_alpha) == (True, 65536, 2.0, None)
    for bad in ({"max_cached_tokens": 0}, {"batch_wait_ms": -1}, {"incremental": "maybe"}):
        with pytest.raises(ValueError):
            ScorerConfig.model_validate({**base, **bad})
