"""ImplicitRewardScorer against an independent, deliberately slow recomputation.

The reference below shares no code with the scorer: it tokenizes on its own, finds the
prompt/response boundary on its own, and runs the model once per response token on the bare
prefix (no padding, no batching, no logits_to_keep), so any batching, padding, boundary or EOS
mistake in the scorer shows up as a mismatch.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import torch
from tiny_models import Loaded

from proxy.config import ModelSpec, ScorerConfig
from scorers.implicit import ImplicitRewardScorer, ScoringModel, plan_batches
from scorers.loading import load_causal_lm, pick_device_dtype
from scorers.templates import TEMPLATES, resolve_template

TOL = 1e-5
CPU, FP32 = torch.device("cpu"), torch.float32

TEXTS = [
    "Sure! Here is a short poem about the sea.",
    "Red leaves drift and fall",
    "The",
    "One upon a time a small fox lived at the edge of a forest, and every morning it walked to the river.",
    " leading space and trailing newline\n",
]


# ---------------------------------------------------------------- the independent reference


def slow_logprob(model, tokenizer, prompt_text: str, response: str, finished: bool) -> float:
    """Sum of log p(token | prefix) over response tokens, one unpadded forward per token."""
    add_special = not prompt_text.startswith(tokenizer.bos_token)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"]
    full_ids = tokenizer(prompt_text + response, add_special_tokens=add_special)["input_ids"]
    boundary = 0
    while boundary < min(len(prompt_ids), len(full_ids)) and prompt_ids[boundary] == full_ids[boundary]:
        boundary += 1
    assert boundary > 0
    if finished:
        full_ids = full_ids + [tokenizer.eos_token_id]
    total = 0.0
    with torch.no_grad():
        for i in range(boundary, len(full_ids)):
            logits = model(input_ids=torch.tensor([full_ids[:i]])).logits[0, -1]
            total += torch.log_softmax(logits.float(), dim=-1)[full_ids[i]].item()
    return total


def slow_score(tuned, untuned, prompts: tuple[str, str], response: str, finished: bool) -> float:
    """tuned/untuned are (model, tokenizer, spec); prompts are the rendered prompt texts."""
    (tuned_model, tuned_tok, _), (untuned_model, untuned_tok, _) = tuned, untuned
    return slow_logprob(tuned_model, tuned_tok, prompts[0], response, finished) - slow_logprob(
        untuned_model, untuned_tok, prompts[1], response, finished
    )


# ---------------------------------------------------------------- fixtures (shared ones: tests/tiny_models.py)


def _with_spec(loaded: Loaded, **fields: object) -> Loaded:
    model, tokenizer, spec = loaded
    return model, tokenizer, spec.model_copy(update=fields)


async def _scores(scorer: ImplicitRewardScorer, prompt, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
    with scorer.open(prompt) as session:
        return await session.score(texts, finished)


def _assert_close(got: Sequence[float], want: Sequence[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert abs(g - w) < TOL, (got, want)


# ---------------------------------------------------------------- templates


ZEPHYR_HI = "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_zephyr_with_empty_system_prompt_renders_exactly(llama_pair):
    model, tokenizer, spec = llama_pair[0]
    sm = ScoringModel.from_spec(model, tokenizer, spec.model_copy(update={"chat_template": "zephyr", "system_prompt": ""}))
    assert sm.render([{"role": "user", "content": "Hi"}]) == ZEPHYR_HI


def test_system_prompt_rules(llama_pair):
    model, tokenizer, spec = llama_pair[0]
    none = ScoringModel.from_spec(model, tokenizer, spec.model_copy(update={"chat_template": "zephyr", "system_prompt": None}))
    assert none.render([{"role": "user", "content": "Hi"}]) == "<|user|>\nHi</s>\n<|assistant|>\n"
    given = ScoringModel.from_spec(model, tokenizer, spec.model_copy(update={"chat_template": "zephyr", "system_prompt": "Be nice."}))
    assert given.render([{"role": "user", "content": "Hi"}]).startswith("<|system|>\nBe nice.</s>\n")
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]
    assert given.render(own) == "<|system|>\nMine.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_named_templates(llama_pair):
    model, tokenizer, spec = llama_pair[0]

    def render(name: str) -> str:
        sm = ScoringModel.from_spec(model, tokenizer, spec.model_copy(update={"chat_template": name, "system_prompt": None}))
        return sm.render([{"role": "user", "content": "Hi"}])

    assert render("tulu") == "<|user|>\nHi\n<|assistant|>\n"
    assert render("openchat") == "<s>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant:"
    assert render("raw") == "Hi"
    assert render("zephyr") == "<|user|>\nHi</s>\n<|assistant|>\n"


def test_resolve_template():
    assert resolve_template(None) is None
    assert resolve_template("zephyr") == TEMPLATES["zephyr"]
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_template(literal) == literal
    with pytest.raises(ValueError, match="zephyer"):
        resolve_template("zephyer")


# ---------------------------------------------------------------- exact scores


@pytest.mark.parametrize("finished", [False, True])
async def test_matches_slow_reference(llama_pair, finished):
    tuned, untuned = llama_pair
    scorer = ImplicitRewardScorer.from_loaded(tuned, untuned)
    prompt = "Write a haiku about autumn leaves."
    with scorer.open(prompt) as session:
        prompts = session.prompt_texts
        got = await session.score(TEXTS, [finished] * len(TEXTS))
    assert prompts[0].startswith("<|system|>\n</s>\n<|user|>\nWrite a haiku")  # tokenizer's own zephyr template
    want = [slow_score(tuned, untuned, prompts, t, finished) for t in TEXTS]
    _assert_close(got, want)
    assert len({round(x, 3) for x in got}) == len(got)  # the numbers are not degenerate
    await scorer.aclose()


async def test_eos_term_is_added_when_finished(llama_pair):
    tuned, untuned = llama_pair
    scorer = ImplicitRewardScorer.from_loaded(tuned, untuned)
    got = await _scores(scorer, "Hi", [TEXTS[0], TEXTS[0]], [False, True])
    assert abs(got[0] - got[1]) > 1e-3
    await scorer.aclose()


async def test_batching_and_padding_do_not_change_scores(llama_pair):
    """All texts in one call, split into several small padded batches, equal one-by-one calls."""
    tuned, untuned = llama_pair
    finished = [i % 2 == 0 for i in range(len(TEXTS))]
    batched = ImplicitRewardScorer.from_loaded(tuned, untuned, batch_size=2, max_batch_tokens=90)
    single = ImplicitRewardScorer.from_loaded(tuned, untuned, batch_size=1)
    prompt = [{"role": "user", "content": "Tell me a story."}]
    together = await _scores(batched, prompt, TEXTS, finished)
    with single.open(prompt) as session:
        alone = [(await session.score([t], [f]))[0] for t, f in zip(TEXTS, finished)]
        prompts = session.prompt_texts
    _assert_close(together, alone)
    _assert_close(together, [slow_score(tuned, untuned, prompts, t, f) for t, f in zip(TEXTS, finished)])
    await batched.aclose()
    await single.aclose()


async def test_empty_response(llama_pair):
    tuned, untuned = llama_pair
    scorer = ImplicitRewardScorer.from_loaded(tuned, untuned)
    with scorer.open("Hi") as session:
        got = await session.score(["", ""], [False, True])
        prompts = session.prompt_texts
    assert got[0] == 0.0
    _assert_close(got[1:], [slow_score(tuned, untuned, prompts, "", True)])
    await scorer.aclose()


async def test_seam_token_counts_as_response(mixed_pair):
    """A raw prompt ending mid-word: the merged token straddling the seam is scored, in both tokenizers."""
    raw = {"chat_template": "raw", "system_prompt": None}
    tuned, untuned = _with_spec(mixed_pair[0], **raw), _with_spec(mixed_pair[1], **raw)
    prompt, response = "The small fox walked to th", "e river"
    for _, tokenizer, _ in (tuned, untuned):  # the case really has a seam merge
        assert tokenizer(prompt + response)["input_ids"][: len(tokenizer(prompt)["input_ids"])] != tokenizer(prompt)["input_ids"]
    scorer = ImplicitRewardScorer.from_loaded(tuned, untuned)
    got = await _scores(scorer, prompt, [response, response], [False, True])
    want = [slow_score(tuned, untuned, (prompt, prompt), response, f) for f in (False, True)]
    _assert_close(got, want)
    await scorer.aclose()


async def test_unicode_response(llama_pair):
    tuned, untuned = llama_pair
    scorer = ImplicitRewardScorer.from_loaded(tuned, untuned)
    texts = ["Café — naïve 日本語 🙂", "Ünïcödé ✓", "🙂"]
    with scorer.open("Say something in many scripts.") as session:
        got = await session.score(texts, [False, True, False])
        prompts = session.prompt_texts
    _assert_close(got, [slow_score(tuned, untuned, prompts, t, f) for t, f in zip(texts, [False, True, False])])
    await scorer.aclose()


async def test_pair_with_different_tokenizers(mixed_pair):
    tuned, untuned = mixed_pair
    assert len(tuned[1]) != len(untuned[1])
    scorer = ImplicitRewardScorer.from_loaded(tuned, untuned, batch_size=3)
    finished = [True, False, True, False, False]
    with scorer.open("Write a haiku about autumn leaves.") as session:
        got = await session.score(TEXTS, finished)
        prompts = session.prompt_texts
    # Tokenizer B has no BOS of its own: its openchat template writes one, which must not be doubled.
    assert prompts[1].startswith("<s><|end_of_turn|>GPT4 Correct User: Write a haiku")
    assert tuned[1](TEXTS[0])["input_ids"] != untuned[1](TEXTS[0])["input_ids"]
    _assert_close(got, [slow_score(tuned, untuned, prompts, t, f) for t, f in zip(TEXTS, finished)])
    await scorer.aclose()


@pytest.mark.parametrize("config_name, pair_name", [("tiny_scorer_config", "llama_pair"), ("tiny_mixed_scorer_config", "mixed_pair")])
async def test_sdpa_default_is_close(request, config_name: str, pair_name: str):
    """from_config loads by path with transformers' default attention (SDPA): its fp32 kernels
    drift by ~1e-6 per token against eager, so the bound here is looser than TOL."""
    config: ScorerConfig = request.getfixturevalue(config_name)
    scorer = ImplicitRewardScorer.from_config(config)
    assert scorer.tuned.model.config._attn_implementation == "sdpa"
    reference = ImplicitRewardScorer.from_loaded(*request.getfixturevalue(pair_name))
    got = await _scores(scorer, "Hi", TEXTS, [True] * 5)
    want = await _scores(reference, "Hi", TEXTS, [True] * 5)
    assert max(abs(g - w) for g, w in zip(got, want)) < 2e-4
    await scorer.aclose()
    await reference.aclose()


# ---------------------------------------------------------------- errors and lifecycle


async def test_no_context_token_raises(mixed_pair):
    """Tokenizer B adds no BOS; an empty raw prompt leaves nothing to condition the first token on."""
    raw = {"chat_template": "raw", "system_prompt": None}
    scorer = ImplicitRewardScorer.from_loaded(_with_spec(mixed_pair[1], **raw), _with_spec(mixed_pair[1], **raw))
    with pytest.raises(ValueError, match="no context token"):
        await _scores(scorer, "", ["Hello"], [False])
    await scorer.aclose()


async def test_closed_session_and_scorer(llama_pair):
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair)
    session = scorer.open("Hi")
    session.close()
    session.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await session.score(["x"], [False])
    with pytest.raises(ValueError, match="finished flags"):
        await scorer.open("Hi").score(["a", "b"], [False])
    await scorer.aclose()
    await scorer.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.open("Hi")


async def test_forward_runs_off_the_event_loop(llama_pair, monkeypatch):
    """Every forward happens on the worker thread; a plain wrapper also exercises the path
    where the forward does not advertise logits_to_keep (all logits computed)."""
    tuned, untuned = llama_pair
    expected = await _scores(ImplicitRewardScorer.from_loaded(tuned, untuned), "Hi", TEXTS, [True] * 5)
    threads: list[int] = []
    for model in (tuned[0], untuned[0]):
        original = model.forward

        def recording(*args, _original=original, **kwargs):
            threads.append(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, "forward", recording)
    loop_thread = threading.get_ident()
    got = await _scores(ImplicitRewardScorer.from_loaded(tuned, untuned), "Hi", TEXTS, [True] * 5)
    assert threads and loop_thread not in threads
    assert len(set(threads)) == 1
    _assert_close(got, expected)


async def test_event_loop_stays_responsive(llama_pair):
    """While the worker scores, other coroutines keep running."""
    scorer = ImplicitRewardScorer.from_loaded(*llama_pair, batch_size=1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await _scores(scorer, "Hi", TEXTS * 4, [True] * 20)
    task.cancel()
    assert ticks > 1
    await scorer.aclose()


# ---------------------------------------------------------------- loading and batching helpers


def test_load_error_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        load_causal_lm(ModelSpec(path=str(missing)), CPU, FP32)


def test_pick_device_dtype():
    assert pick_device_dtype("cpu", "auto") == (CPU, torch.float32)
    assert pick_device_dtype("cpu", "bfloat16") == (CPU, torch.bfloat16)
    device, dtype = pick_device_dtype("auto", "auto")
    assert dtype == (torch.bfloat16 if device.type == "cuda" else torch.float32)


def test_plan_batches_respects_both_limits():
    lengths = [5, 50, 7, 30, 30, 8, 200]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64
    assert [6] in batches  # too long for the token limit: alone


def test_fixture_models_differ(llama_pair):
    (tuned, tok, _), (untuned, _, _) = llama_pair
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(tuned(input_ids=ids).logits, untuned(input_ids=ids).logits)
