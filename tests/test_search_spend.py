"""The two spending settings of chunk-level beam search, off by default (the paper's search):
a horizon (search the first H tokens, then finish the chosen beam with one plain continuation)
and a sample schedule (how many chunks each step draws per beam). Exact request patterns on the
scripted upstream, and the answer against the tree the search recorded."""
from __future__ import annotations

import re

import pytest

from proxy.config import ConfigError, SearchConfig, ServerCaps, cap_problem
from proxy.search import mode_name, search
from proxy.types import derive_seed
from tests.doubles import FnScorer, ScriptedUpstream, word_responder


def sample_sum(text: str, finished: bool) -> float:
    """Sum of the sample indices of the words: a known, total order (s3 beats s1)."""
    return float(sum(int(m) for m in re.findall(r"s(\d+)t", text))) + (0.5 if finished else 0.0)


async def test_a_horizon_searches_its_tokens_then_finishes_the_best_beam_once() -> None:
    up = ScriptedUpstream(word_responder())
    cfg = SearchConfig(w=2, k=2, l=3, max_new_tokens=10, horizon=6, seed=7)
    r = await search("Q:", up, FnScorer(sample_sum), cfg)
    # search: the prompt's W*K = 4 chunks of 3, then K = 2 per beam of 3 more; then the best
    # beam's rest (10 - 6 = 4 tokens) in one plain sample
    assert [(c.n, c.max_tokens) for c in up.calls] == [(4, 3), (2, 3), (2, 3), (1, 4)]
    searched = r.steps[1]
    best = max((r.nodes[i] for i in searched.survivors), key=lambda c: c.score)
    final = r.nodes[r.chosen]
    assert r.steps[-1].expanded == [best.id] and final.parent == best.id
    assert r.text == best.text + final.chunk and r.tokens == 10 and r.mode == "cbs-w2k2l3-h6"
    assert up.calls[-1].seed == derive_seed(7, 3, 0) and up.calls[-1].prompt == "Q:" + best.text
    assert final.score == sample_sum(r.text, final.finished)


async def test_a_horizon_past_the_answer_changes_nothing_and_a_finished_best_beam_is_not_extended() -> None:
    plain_cfg = SearchConfig(w=2, k=2, l=3, max_new_tokens=6, seed=1)
    runs = []
    for cfg in (plain_cfg, plain_cfg.model_copy(update={"horizon": 6}), plain_cfg.model_copy(update={"horizon": 50})):
        up = ScriptedUpstream(word_responder())
        r = await search("Q:", up, FnScorer(sample_sum), cfg)
        runs.append(([(c.n, c.max_tokens, c.seed) for c in up.calls], r.text))
    assert runs[0] == runs[1] == runs[2]
    # every sample finishes at once: the chosen beam is finished, nothing is added
    up = ScriptedUpstream(word_responder(finish_when=lambda c, i: True))
    r = await search("Q:", up, FnScorer(sample_sum), SearchConfig(w=2, k=2, l=3, max_new_tokens=9, horizon=3))
    assert len(up.calls) == 1 and r.finished and len(r.steps) == 1


async def test_a_sample_schedule_sets_each_steps_draw_per_beam_the_last_repeated() -> None:
    up = ScriptedUpstream(word_responder())
    cfg = SearchConfig(w=2, k=2, l=2, max_new_tokens=8, sample_schedule=[5, 3, 1], seed=2)
    r = await search("Q:", up, FnScorer(sample_sum), cfg)
    # one request per step here (the scripted upstream takes one prompt per request): the prompt's
    # 5, then 3 for each of the 2 beams, then 1 each, then 1 each again
    assert [(c.n, c.max_tokens) for c in up.calls] == [(5, 2), (3, 2), (3, 2), (1, 2), (1, 2), (1, 2), (1, 2)]
    assert [len(s.candidates) for s in r.steps] == [5, 6, 2, 2]
    assert r.mode == mode_name(cfg) == "cbs-w2k2l2-s5.3.1"
    # W = 1, schedule [4]: best-of-4 by another name, request for request
    calls = []
    for c in (SearchConfig(w=1, k=4, max_new_tokens=5, seed=3),
              SearchConfig(w=1, k=1, max_new_tokens=5, seed=3, sample_schedule=[4])):
        up = ScriptedUpstream(word_responder())
        r = await search("Q:", up, FnScorer(sample_sum), c)
        calls.append(([(q.n, q.max_tokens, q.seed) for q in up.calls], r.text))
    assert calls[0] == calls[1]


async def test_a_schedule_that_draws_more_than_one_needs_a_scorer() -> None:
    with pytest.raises(ConfigError, match="needs a scorer"):
        await search("Q:", ScriptedUpstream(word_responder()), None, SearchConfig(sample_schedule=[1, 2]))
    r = await search("Q:", ScriptedUpstream(word_responder()), None, SearchConfig(max_new_tokens=3,
                                                                                  sample_schedule=[1]))
    assert r.tokens == 3


def test_the_caps_bound_a_schedules_widest_step() -> None:
    caps = ServerCaps(max_w_times_k=8, min_l=1)
    assert cap_problem(SearchConfig(w=2, k=2, sample_schedule=[8, 4]), caps) is None
    wide_first = cap_problem(SearchConfig(w=2, k=2, sample_schedule=[9, 1]), caps)
    wide_later = cap_problem(SearchConfig(w=4, k=1, sample_schedule=[2, 3]), caps)
    assert wide_first is not None and wide_first.what == "samples per step = 9"
    assert wide_later is not None and wide_later.for_request() == "samples per step = 12 exceeds this server's cap of 8"
    assert wide_later.param == "w2s.sample_schedule"


async def test_budgets_bound_the_finishing_step_too() -> None:
    """The last step's bound is the whole rest of the answer, so a budget that cannot pay for it
    stops the search before it, answering with the searched beam."""
    from proxy.budget import Budget

    cfg = SearchConfig(w=1, k=2, l=3, max_new_tokens=40, horizon=3)
    up = ScriptedUpstream(word_responder())
    r = await search("Q:", up, FnScorer(sample_sum), cfg, budget=Budget(max_tokens=30))
    assert [(c.n, c.max_tokens) for c in up.calls] == [(2, 3)]
    assert r.stopped_by == "budget" and r.tokens == 3


def test_the_servers_plain_sampling_resets_every_setting_that_shapes_a_search() -> None:
    """A server whose default search has a horizon and a schedule still serves the bare model
    name as one plain sample, with the default search's sampling settings."""
    from proxy.serving.guidance import GuidanceModes

    default = SearchConfig(w=2, k=2, l=8, horizon=4, sample_schedule=[4, 2], temperature=0.3)
    plain = GuidanceModes("m", default, {}, ServerCaps(), guided=False).resolve("m")
    assert plain.mode == "base" and mode_name(plain.search) == "base"
    assert plain.search == SearchConfig(temperature=0.3)
