"""A response longer than the guide's context is scored clipped, never a failure after billing.

The up-front check counts one guide token per upstream token; the toy upstream's words are one
cl100k token each but several tokens in the tiny models' ~400-token vocabularies, so a best-of-4
asking for the whole room gets answers the guide cannot hold. The scorer scores the longest prefix
of the text that fits (scorers.room): the same number on the incremental path, the full
recompute and an independent slow computation of that prefix.
"""
from __future__ import annotations

import random
from typing import Any

import openai
import pytest
from tiny_models import Loaded, TinyModelDirs, load_eager

from proxy.config import AppConfig, SearchConfig, ServerConfig
from proxy.presets import resolve_server
from proxy.serving.app import GuidanceServer
from proxy.testing.toy_server import ToyCompletionsServer
from scorers.base import ScorerContextError
from scorers.implicit import ImplicitRewardScorer
from scorers.room import fit_response
from tests.conftest import on_any_port, upstream_config
from tests.test_implicit_scorer import slow_score

TOL = 1e-4
STORY = ("Once upon a time, a small fox lived at the edge of a forest.  Every morning it walked to the river\n\n"
         "to drink — café, naïve, 日本語, 🙂 and 👩\u200d💻; e\u0301 3.14159 #tags @home 100%!\tThe end. ") * 3


def short(loaded: Loaded, positions: int) -> Loaded:
    """The model told its context is `positions` long (its config is what the scorer reads)."""
    loaded[0].config.max_position_embeddings = positions
    return loaded


def n_tokens(loaded: Loaded, prompt_text: str, text: str) -> int:
    """Independent of the scorer's code: ids of prompt + text the way the scorer must see them."""
    tok = loaded[1]
    return len(tok(prompt_text + text, add_special_tokens=not prompt_text.startswith(tok.bos_token))["input_ids"])


@pytest.fixture(scope="module")
def short_mixed(tiny_model_dirs: TinyModelDirs) -> tuple[Loaded, Loaded]:
    """Two vocabularies, two short contexts (fresh copies: the shared fixtures keep 512)."""
    return short(load_eager(tiny_model_dirs.mistral), 72), short(load_eager(tiny_model_dirs.gpt2), 80)


async def test_clipped_responses_score_exactly(short_mixed: tuple[Loaded, Loaded]) -> None:
    """A beam grows past the room chunk by chunk; every candidate's score is the same on the
    incremental path, the full recompute, and the slow reference of the prefix that fits."""
    inc = ImplicitRewardScorer.from_loaded(*short_mixed)
    full = ImplicitRewardScorer.from_loaded(*short_mixed, incremental=False)
    rng = random.Random(5)
    prompt = "Tell me a story."
    clipped = 0
    with inc.open(prompt) as si, full.open(prompt) as sf:
        prompts = si.prompt_texts
        limits = [m[0].config.max_position_embeddings for m in short_mixed]
        encoded = [sm.encode_prompt(t) for sm, t in zip((inc.tuned, inc.untuned), prompts)]
        beam = ""
        while len(beam) < len(STORY):
            cands = [STORY[:len(beam) + rng.randint(1, 12)] for _ in range(3)]
            finished = [False, True, rng.random() < 0.5]
            got = await si.score(cands, finished)
            assert max(abs(g - w) for g, w in zip(got, await sf.score(cands, finished))) < TOL
            for text, done, score in zip(cands, finished, got):
                fitted = fit_response((inc.tuned, inc.untuned), encoded, text, done)
                if not fitted.clipped:
                    continue
                clipped += 1
                cut = fitted.text
                assert text.startswith(cut) and not fitted.finished
                assert all(n_tokens(m, p, cut) <= lim for m, p, lim in zip(short_mixed, prompts, limits))
                longer = text[:len(cut) + 1]
                if longer != text or done:  # one more character (or the text's EOS) does not fit
                    assert any(n_tokens(m, p, longer) + (longer == text) > lim
                               for m, p, lim in zip(short_mixed, prompts, limits))
                if clipped % 7 == 1:  # the slow reference is one forward per token: a sample
                    assert abs(score - slow_score(*short_mixed, prompts, cut, False)) < TOL
            beam = cands[0]
        assert clipped > 10
    await inc.aclose()
    await full.aclose()


async def test_a_prompt_alone_too_long_is_a_context_error(short_mixed: tuple[Loaded, Loaded]) -> None:
    scorer = ImplicitRewardScorer.from_loaded(*short_mixed)
    with scorer.open("word " * 100) as session, pytest.raises(ScorerContextError) as e:
        await session.score(["x"], [True])
    assert e.value.field == "prompt" and "positions" in str(e.value)
    await scorer.aclose()


def app(toy: ToyCompletionsServer) -> AppConfig:
    return AppConfig(upstream=upstream_config(toy), search=SearchConfig(),
                     server=ServerConfig.model_validate(resolve_server({})))


@pytest.mark.parametrize("stream", [False, True])
async def test_best_of_4_asking_for_the_whole_room_answers(tiny_model_dirs: TinyModelDirs, stream: bool) -> None:
    """The fault run's case: best-of-4 on the toy upstream, a guide with a small context,
    max_tokens the most the check allows. Before: 500 after the upstream was paid. Now: the
    answer, scored; one token more is a 400 before any upstream call."""
    pair = short(load_eager(tiny_model_dirs.llama_tuned), 120), short(load_eager(tiny_model_dirs.llama_untuned), 120)
    scorer = ImplicitRewardScorer.from_loaded(*pair)
    room = scorer.response_room("Hi")
    assert room is not None and 40 < room < 110
    async with ToyCompletionsServer(eos_prob=0.0) as toy:
        async with GuidanceServer(on_any_port(app(toy)), scorer=scorer, shutdown_timeout_s=0.5) as server:
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
            try:
                ask: dict[str, Any] = dict(model="toy-instruct+bon4", prompt="Hi", seed=1)
                if stream:
                    events = [e async for e in await client.completions.create(max_tokens=room - 1, stream=True,
                                                                               **ask)]
                    text, score = "".join(c.text for e in events for c in e.choices), 0.0
                else:
                    r = await client.completions.create(max_tokens=room - 1, **ask)
                    text, score = r.choices[0].text, r.model_extra["w2s"]["score"]
                assert len(toy.requests) == 1 and isinstance(score, float)
                with scorer.open("Hi") as session:  # the answer did not fit whole: it was scored clipped
                    assert n_tokens(pair[0], session.prompt_texts[0], text) > 120
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.completions.create(max_tokens=room, **ask)
                assert refused.value.body["code"] == "context_length_exceeded"
                assert len(toy.requests) == 1
            finally:
                await client.close()
    await scorer.aclose()
