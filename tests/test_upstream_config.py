"""Typed upstream families: one model per `kind` (completions when none is given), each with its
own fields and key default, another family's fields refused by name; and the one mark of what
shapes an answer, read by both the response cache and the AlpacaEval fingerprint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.alpaca_eval.identity import config_fingerprint
from proxy.config import (
    AnthropicConfig,
    AppConfig,
    ConfigError,
    OpenAIChatConfig,
    OpenAICompletionsConfig,
    answer_shaping,
    format_validation_error,
    parse_upstream,
)
from proxy.presets import build_config, load_preset, preset_names
from proxy.types import Conversation, SamplingParams
from proxy.upstreams.cache import CachedUpstream
from tests.doubles import ScriptedUpstream, word_responder


def problem(upstream: Any) -> str:
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate({"upstream": upstream})
    return format_validation_error(e.value)


def test_kind_picks_the_family_and_completions_is_the_default() -> None:
    assert type(parse_upstream({"model": "m"})) is OpenAICompletionsConfig
    assert type(parse_upstream({"kind": "openai-chat", "model": "m"})) is OpenAIChatConfig
    assert type(parse_upstream({"kind": "anthropic", "model": "m"})) is AnthropicConfig
    assert type(AppConfig.model_validate({"upstream": {"model": "m"}}).upstream) is OpenAICompletionsConfig
    made = OpenAIChatConfig(model="m", continuation="prefix")
    assert AppConfig(upstream=made).upstream is made and parse_upstream(made) is made
    assert problem({"kind": "gemini", "model": "m"}) == (
        "upstream.kind: Input should be 'openai-completions', 'openai-chat' or 'anthropic'")


def test_each_family_has_its_own_key_variable() -> None:
    assert parse_upstream({"model": "m"}).api_key_env == "OPENAI_API_KEY"
    assert parse_upstream({"kind": "openai-chat", "model": "m"}).api_key_env == "OPENAI_API_KEY"
    assert parse_upstream({"kind": "anthropic", "model": "m"}).api_key_env == "ANTHROPIC_API_KEY"
    assert parse_upstream({"kind": "anthropic", "model": "m", "api_key_env": "MINE"}).api_key_env == "MINE"


def test_another_familys_field_is_refused_by_name() -> None:
    assert problem({"model": "m", "continuation": "prefix"}) == (
        "upstream.continuation: a field of openai-chat upstreams, not of openai-completions (set `kind`, or remove it)")
    assert problem({"kind": "openai-chat", "model": "m", "prompt_template": "{instruction}"}).startswith(
        "upstream.prompt_template: a field of openai-completions upstreams, not of openai-chat")
    says = problem({"kind": "anthropic", "model": "m", "hold_trailing_whitespace": True, "supports_n": False})
    assert "upstream.hold_trailing_whitespace: a field of openai-completions and openai-chat upstreams" in says
    assert "upstream.supports_n:" in says
    assert problem({"model": "m", "modle": "x"}) == "upstream.modle: unknown field"
    with pytest.raises(ConfigError, match=r"upstream\.seed_param: a field of"):
        build_config({"upstream": {"preset": "anthropic", "seed_param": None}})


def test_every_shipped_upstream_preset_validates() -> None:
    for name in preset_names("upstream"):
        parse_upstream(load_preset("upstream", name))


def test_what_shapes_an_answer_is_read_from_the_marks() -> None:
    completions = parse_upstream({"model": "m", "base_url": "http://a/v1", "timeout_s": 3, "prices": {"prompt": 1}})
    assert answer_shaping(completions) == {  # the fields AlpacaEval fingerprints always held, nothing else
        "kind": "openai-completions", "model": "m", "context_window": None,
        "prompt_template": "Instruction: {instruction}\nOutput:",
        "chat": {"system": "{content}\n\n", "assistant": " {content}\n\n"}}
    held = completions.model_copy(update={"hold_trailing_whitespace": True, "extra_body": {"x": 1}})
    assert answer_shaping(held) == {**answer_shaping(completions), "hold_trailing_whitespace": True,
                                    "extra_body": {"x": 1}}  # counted where set
    chat = parse_upstream({"kind": "openai-chat", "model": "m", "seed_param": "random_seed"})
    assert answer_shaping(chat) == {"kind": "openai-chat", "model": "m", "context_window": None,
                                    "continuation": "continue_final_message", "seed_param": "random_seed"}
    claude = parse_upstream({"kind": "anthropic", "model": "c", "context_window": 9})
    assert answer_shaping(claude) == {"kind": "anthropic", "model": "c", "context_window": 9}


async def test_the_cache_and_the_fingerprint_agree_where_a_model_is_asked_is_not_what_it_answers(
        tmp_path: Path) -> None:
    base = build_config({"upstream": "gpt-3.5-turbo-instruct", "search": "cbs-w2k2l30"})

    def variant(**update: Any) -> AppConfig:
        return base.model_copy(update={"upstream": base.upstream.model_copy(update=update)})

    def cache_key(cfg: AppConfig) -> str:
        cached = CachedUpstream(ScriptedUpstream(word_responder()), cfg.upstream, tmp_path)
        return cached.key(Conversation.instruction("q"), ["a"], SamplingParams(n=2, max_tokens=4, seed=1), [1])

    moved = variant(base_url="http://10.0.0.9/v1", max_concurrency=3)
    assert cache_key(moved) == cache_key(base) and config_fingerprint(moved) == config_fingerprint(base)
    for changed in (variant(model="other"), variant(context_window=2048), variant(prompt_template="{instruction}"),
                    variant(hold_trailing_whitespace=True), variant(seed_param=None)):
        assert cache_key(changed) != cache_key(base) and config_fingerprint(changed) != config_fingerprint(base)
