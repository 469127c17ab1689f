"""The CBS loop: request pattern, selection and termination against exact expectations."""
from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Sequence

import pytest

from proxy.config import ConfigError, SearchConfig
from proxy.search import cut_at_stop, mode_name, search
from proxy.types import Continuation, Conversation, SampleResult, SamplingParams
from tests.doubles import Call, FnScorer, ScriptedUpstream, word_responder


def sample_sum(text: str, finished: bool) -> float:
    """Score = sum of the sample indices of the words in the text: a known, total order."""
    return float(sum(int(m) for m in re.findall(r"s(\d+)t", text))) + (0.5 if finished else 0.0)


def steps_of(up: ScriptedUpstream, prompt: str) -> list[int]:
    """Response length (in words) of each call's prompt, i.e. which step it belongs to."""
    return [len(c.prompt[len(prompt):].split()) for c in up.calls]


@pytest.mark.parametrize("narrow", [False, True])
async def test_cbs_request_pattern_is_exact(narrow: bool) -> None:
    up = ScriptedUpstream(word_responder())
    scorer = FnScorer(sample_sum)
    cfg = SearchConfig(w=2, k=3, l=5, max_new_tokens=12, temperature=0.7, seed=1, narrow_start=narrow)
    r = await search("Q:", up, scorer, cfg)
    # step 1: the prompt, W*K = 6 samples in one request as the paper's code draws them (narrow: K = 3);
    # steps 2-3: two beams of K each; token budget 12 = 5 + 5 + 2
    first = 3 if narrow else 6
    assert [(c.n, c.max_tokens) for c in up.calls] == [(first, 5), (3, 5), (3, 5), (3, 2), (3, 2)]
    assert steps_of(up, "Q:") == [0, 5, 5, 10, 10]
    assert [len(s.expanded) for s in r.steps] == [1, 2, 2]
    assert [len(s.candidates) for s in r.steps] == [first, 6, 6]
    assert [len(s.survivors) for s in r.steps] == [2, 2, 2]
    assert r.tokens == 12 and not r.finished
    assert r.calls == 5 and len({c.seed for c in up.calls}) == 5  # a distinct seed per request
    assert scorer.open_sessions == 0
    assert r.mode == mode_name(cfg) == ("cbs-w2k3l5-narrow" if narrow else "cbs-w2k3l5")


async def test_the_first_selection_chooses_w_of_w_times_k() -> None:
    """With K <= W a K-sample start keeps every first chunk; the paper's start picks the best W
    of W*K, so the first step already steers."""
    up = ScriptedUpstream(word_responder())
    r = await search("Q:", up, FnScorer(sample_sum), SearchConfig(w=2, k=2, l=3, max_new_tokens=6))
    first = r.steps[0]
    assert len(first.candidates) == 4
    kept = [r.nodes[i] for i in first.survivors]
    assert [c.score for c in kept] == sorted((c.score for c in first.candidates), reverse=True)[:2]
    assert not all(c.survived for c in first.candidates)


async def test_best_of_n_and_plain_sampling_are_the_same_with_either_start() -> None:
    for w, k, l in ((1, 4, None), (1, 1, None), (1, 3, 2)):
        calls = []
        for narrow in (False, True):
            up = ScriptedUpstream(word_responder())
            cfg = SearchConfig(w=w, k=k, l=l, max_new_tokens=6, seed=3, narrow_start=narrow)
            r = await search("Q:", up, FnScorer(sample_sum) if w * k > 1 else None, cfg)
            calls.append(([(c.n, c.max_tokens, c.seed, c.prompt) for c in up.calls], r.text))
        assert calls[0] == calls[1]


async def test_survivors_are_top_w_and_scores_are_full_text_scores() -> None:
    up = ScriptedUpstream(word_responder())
    scorer = FnScorer(sample_sum)
    r = await search("Q:", up, scorer, SearchConfig(w=3, k=4, l=3, max_new_tokens=9))
    for step in r.steps:
        pool = [r.nodes[i] for i in step.carried] + step.candidates
        for c in pool:
            assert c.score == sample_sum(c.text, c.finished)
        best = sorted((c.score for c in pool), reverse=True)[:3]
        assert [r.nodes[i].score for i in step.survivors] == best
        expanded_next = set(r.steps[step.step].expanded) if step.step < len(r.steps) else set()
        assert expanded_next <= set(step.survivors)
    assert r.score == max(c.score for c in r.nodes.values() if c.step == len(r.steps))


async def test_finished_beams_are_carried_once_and_never_expanded() -> None:
    # Sample 2 of the first step finishes with the best score; the others keep going.
    def finish(call: Call, i: int) -> bool:
        return call.prompt == "Q:" and i == 2

    up = ScriptedUpstream(word_responder(finish))
    scorer = FnScorer(lambda t, f: 100.0 if f else sample_sum(t, f))
    r = await search("Q:", up, scorer, SearchConfig(w=2, k=3, l=2, max_new_tokens=6))
    done = [c for c in r.nodes.values() if c.finished]
    assert len(done) == 1
    fin = done[0]
    assert all(fin.id in s.survivors for s in r.steps)
    for s in r.steps[1:]:
        assert fin.id in s.carried and fin.id not in s.expanded
        assert s.survivors.count(fin.id) == 1
    assert not any(c.prompt == "Q:" + fin.text for c in up.calls)
    # one slot held by the finished beam: every later step expands a single beam
    assert [len(s.expanded) for s in r.steps] == [1, 1, 1]
    assert r.text == fin.text and r.finished and r.score == 100.0


async def test_search_stops_when_all_kept_beams_are_finished() -> None:
    up = ScriptedUpstream(word_responder(lambda call, i: True))
    r = await search("Q:", up, FnScorer(sample_sum), SearchConfig(w=2, k=2, l=4, max_new_tokens=100))
    assert len(up.calls) == 1 and len(r.steps) == 1 and r.finished


async def test_base_is_one_plain_request() -> None:
    up = ScriptedUpstream(word_responder())
    r = await search("Q:", up, None, SearchConfig(max_new_tokens=7))
    assert [(c.n, c.max_tokens, c.prompt) for c in up.calls] == [(1, 7, "Q:")]
    assert r.text == " s0t0 s0t1 s0t2 s0t3 s0t4 s0t5 s0t6" and r.score is None and len(r.steps) == 1


def _bon_upstream() -> ScriptedUpstream:
    """Four samples; sample 1 runs to the 50-token budget unfinished, the others finish early."""
    def respond(call: Call, i: int) -> Continuation:
        if i == 1:
            return Continuation(" answer1", False, call.max_tokens, "length")
        return Continuation(f" answer{i}", True, 2, "stop")

    return ScriptedUpstream(respond)


BON_SCORES = {0: 3.0, 1: 9.0, 2: 1.0, 3: 7.0}


async def test_best_of_n_is_one_request_and_the_top_scored_sample_finished_or_not() -> None:
    up = _bon_upstream()
    scorer = FnScorer(lambda t, f: BON_SCORES[int(t[-1])])
    r = await search("Q:", up, scorer, SearchConfig(w=1, k=4, l=None, max_new_tokens=50))
    assert [(c.n, c.max_tokens) for c in up.calls] == [(4, 50)]
    # The paper's rule: the unfinished sample 1 scores best, so it is the answer.
    assert r.text == " answer1" and not r.finished and r.score == 9.0


async def test_prefer_finished_makes_best_of_n_the_best_finished_sample() -> None:
    scorer = FnScorer(lambda t, f: BON_SCORES[int(t[-1])])
    cfg = SearchConfig(w=1, k=4, l=None, max_new_tokens=50, prefer_finished=True)
    r = await search("Q:", _bon_upstream(), scorer, cfg)
    assert r.text == " answer3" and r.finished and r.score == 7.0


def _early_finisher() -> ScriptedUpstream:
    """Step 1: sample 0 finishes at once; the others grow a word per token until the budget."""
    return ScriptedUpstream(word_responder(lambda call, i: call.prompt == "Q:" and i == 0))


def _low_finished(text: str, finished: bool) -> float:
    """A finished answer scores 1; an unfinished one scores by its length (grows past 1)."""
    return 1.0 if finished else float(len(text.split()))


@pytest.mark.parametrize("prefer_finished", [False, True])
async def test_a_finished_low_score_beam_loses_to_an_unfinished_high_score_one(prefer_finished: bool) -> None:
    # narrow start: the two first chunks both take a slot, so the finished one is carried to the end
    cfg = SearchConfig(w=2, k=2, l=2, max_new_tokens=4, prefer_finished=prefer_finished, narrow_start=True)
    r = await search("Q:", _early_finisher(), FnScorer(_low_finished), cfg)
    fin = next(c for c in r.nodes.values() if c.finished)
    assert fin.score == 1.0 and fin.step == 1
    assert fin.id in r.steps[0].survivors  # step 1: two slots, both kept
    last = r.steps[-1]
    if prefer_finished:  # the 4-token beams are out of budget unfinished: they rank below it
        assert last.survivors[0] == fin.id and r.text == fin.text and r.finished
    else:  # by score alone the two 4-token beams push the finished one out
        assert fin.id not in last.survivors and [r.nodes[i].score for i in last.survivors] == [4.0, 4.0]
        assert not r.finished and r.score == 4.0 and r.tokens == 4


async def test_all_requests_of_a_step_fly_together_and_score_on_arrival() -> None:
    # Step 1 keeps samples 3 and 2 of 4. Beam s2's request is slow; beam s3's candidates must be
    # scored before it returns.
    def delay(call: Call) -> float:
        return 0.3 if call.prompt.endswith("s2t1") else 0.0

    up = ScriptedUpstream(word_responder(), delay)
    scorer = FnScorer(sample_sum)
    await search("Q:", up, scorer, SearchConfig(w=2, k=2, l=2, max_new_tokens=4))
    assert up.max_in_flight == 2
    slow = next(c for c in up.calls if c.prompt.endswith("s2t1"))
    fast_scored = [s for s in scorer.calls if any(t.startswith(" s3t0 s3t1 ") for t in s.texts)]
    slow_scored = [s for s in scorer.calls if any(t.startswith(" s2t0 s2t1 ") for t in s.texts)]
    assert fast_scored[0].at < slow.started + 0.3 <= slow_scored[0].at


async def test_identical_candidates_take_one_slot() -> None:
    up = ScriptedUpstream(lambda call, i: Continuation(" same", False, 1, "length"))
    r = await search("Q:", up, FnScorer(lambda t, f: 1.0), SearchConfig(w=3, k=3, l=1, max_new_tokens=2))
    assert [len(s.survivors) for s in r.steps] == [1, 1]


async def test_stop_sequence_across_a_chunk_seam_finishes_the_beam() -> None:
    chunks = iter([" one\n", "\ntwo", " three"])
    up = ScriptedUpstream(lambda call, i: Continuation(next(chunks), False, 2, "length"))
    r = await search("Q:", up, None, SearchConfig(l=2, max_new_tokens=6, stop=["\n\n"]))
    assert r.text == " one\n" and r.finished and len(up.calls) == 2
    assert cut_at_stop("ab", "cd", ["bc"]) == ("", True)
    assert cut_at_stop("ab", "cdEND", ["END"]) == ("cd", True)
    assert cut_at_stop("ab", "cd", ["x"]) == ("cd", False)


async def test_stalled_upstream_ends_the_search() -> None:
    up = ScriptedUpstream(lambda call, i: Continuation("", False, 0, "length"))
    r = await search("Q:", up, None, SearchConfig(l=5, max_new_tokens=50))
    assert len(up.calls) == 1 and r.text == "" and not r.finished


async def test_guided_modes_refuse_to_run_without_a_scorer() -> None:
    with pytest.raises(ConfigError, match="needs a scorer"):
        await search("Q:", ScriptedUpstream(word_responder()), None, SearchConfig(w=1, k=4))


async def test_session_is_closed_when_the_upstream_fails() -> None:
    class Boom(Exception):
        pass

    def respond(call: Call, i: int) -> Continuation:
        raise Boom()

    scorer = FnScorer(sample_sum)
    with pytest.raises(Boom):
        await search("Q:", ScriptedUpstream(respond), scorer, SearchConfig(w=2, k=2, l=2))
    assert scorer.open_sessions == 0


async def test_path_follows_parents_to_the_chosen_node() -> None:
    up = ScriptedUpstream(word_responder())
    r = await search("Q:", up, FnScorer(sample_sum), SearchConfig(w=2, k=2, l=2, max_new_tokens=6))
    path = r.path
    assert len(path) == 3 and path[-1] == r.chosen
    assert "".join(r.nodes[i].chunk for i in path) == r.text
    assert [r.nodes[i].step for i in path] == [1, 2, 3]
    assert all(r.nodes[i].survived for i in path)


def test_concurrent_searches_share_nothing() -> None:
    async def main() -> list[str]:
        up = ScriptedUpstream(word_responder())
        scorer = FnScorer(sample_sum)
        cfg = SearchConfig(w=2, k=2, l=2, max_new_tokens=4)
        rs = await asyncio.gather(*(search(f"P{i}:", up, scorer, cfg) for i in range(5)))
        return [r.text for r in rs]

    texts = asyncio.run(main())
    assert len(set(texts)) == 1 and texts[0] == " s3t0 s3t1 s1t0 s1t1"


async def test_scorer_is_told_which_beams_will_grow_after_each_selection() -> None:
    def finish(call: Call, i: int) -> bool:
        return call.prompt == "Q:" and i == 0

    up = ScriptedUpstream(word_responder(finish))
    scorer = FnScorer(lambda t, f: 100.0 if f else sample_sum(t, f))
    r = await search("Q:", up, scorer, SearchConfig(w=2, k=3, l=2, max_new_tokens=4))
    assert len(scorer.kept) == len(r.steps)
    for step, kept in zip(r.steps, scorer.kept):
        growing = [r.nodes[i].text for i in step.survivors if not r.nodes[i].finished and r.nodes[i].tokens < 4]
        assert kept == growing  # the finished survivor's cache is not needed: it never grows


class BatchingUpstream(ScriptedUpstream):
    """Takes up to `per_call` prompts per request, like a completions API given a prompt list."""

    def __init__(self, per_call: int, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.max_prompts_per_call = per_call
        self.batches: list[tuple[int, int, list[int | None]]] = []

    async def sample_batch(self, conversation: Conversation, partials: Sequence[str], params: SamplingParams,
                           seeds: Sequence[int | None] | None = None) -> SampleResult:
        self.batches.append((len(partials), params.max_tokens, list(seeds or [])))
        return await super().sample_batch(conversation, partials, params, seeds)


@pytest.mark.parametrize("per_call", [1, 2, 16])
async def test_the_beams_of_a_step_share_requests_of_equal_budget(per_call: int) -> None:
    # Sample 0 of step 1 finishes short of a chunk (2 tokens, unfinished "length"): its beam has
    # a different budget left from then on, so it never shares a request with the others.
    def respond(call: Call, i: int) -> Continuation:
        if call.prompt == "Q:" and i == 0:
            return Continuation(" a b", False, 2, "length")
        return word_responder()(call, i)

    up = BatchingUpstream(per_call, respond=respond)
    cfg = SearchConfig(w=3, k=3, l=4, max_new_tokens=6, seed=3, narrow_start=True)  # every first chunk kept
    r = await search("Q:", up, FnScorer(lambda t, f: float(len(t))), cfg)
    same_result = await search("Q:", ScriptedUpstream(respond), FnScorer(lambda t, f: float(len(t))), cfg)
    assert r.text == same_result.text and [s.survivors for s in r.steps] == [s.survivors for s in same_result.steps]
    batches = iter(up.batches)
    for step in r.steps:
        by_budget = Counter(min(4, 6 - r.nodes[b].tokens) for b in step.expanded)
        want = sorted((min(per_call, count - j), budget) for budget, count in by_budget.items()
                      for j in range(0, count, per_call))
        got = [next(batches) for _ in want]
        assert sorted((size, budget) for size, budget, _ in got) == want
        assert all(len(seeds) == size for size, _, seeds in got)
    assert next(batches, None) is None
    assert len({min(4, 6 - r.nodes[b].tokens) for b in r.steps[1].expanded}) == 2  # the case was exercised
