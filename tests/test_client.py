"""GuidedClient and the CLI, end to end over the loopback server."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from proxy.client import GuidedClient
from proxy.prompts import PromptError
from proxy.config import AppConfig, ConfigError, SearchConfig
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.prompts import render_chat
from tests.conftest import upstream_config
from tests.doubles import FnScorer


def distinct_words(text: str, finished: bool) -> float:
    return float(len(set(text.split()))) + (1.0 if finished else 0.0)


def client_for(server: ToyCompletionsServer, scorer: FnScorer | None, **search: object) -> GuidedClient:
    cfg = AppConfig(upstream=upstream_config(server), search=SearchConfig(**search))  # type: ignore[arg-type]
    return GuidedClient(cfg, scorer=scorer)


async def test_chat_renders_for_the_upstream_and_passes_messages_to_the_scorer(
        loopback: ToyCompletionsServer) -> None:
    scorer = FnScorer(distinct_words)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a pet."}]
    async with client_for(loopback, scorer, w=2, k=2, l=3, max_new_tokens=6, seed=1) as client:
        r = await client.chat(messages)  # type: ignore[arg-type]
    assert loopback.requests[0]["prompt"] == "Be brief.\n\nInstruction: Name a pet.\nOutput:"
    assert scorer.prompts == [messages]
    last = [r.nodes[i] for i in r.steps[-1].survivors]
    assert r.chosen in r.steps[-1].survivors
    assert r.score == max(n.score for n in last if n.finished == r.finished)


async def test_instruct_uses_the_prompt_template_and_complete_sends_raw(loopback: ToyCompletionsServer) -> None:
    async with client_for(loopback, None, max_new_tokens=4, seed=3) as client:
        a = await client.instruct("Say hi.")
        b = await client.complete("RAW PROMPT")
        with pytest.raises(ConfigError, match="search.w"):
            await client.complete("x", w=0)
    assert [r["prompt"] for r in loopback.requests] == ["Instruction: Say hi.\nOutput:", "RAW PROMPT"]
    assert a.score is None and a.tokens <= 4 and b.text


async def test_overrides_per_call(loopback: ToyCompletionsServer) -> None:
    async with client_for(loopback, FnScorer(distinct_words), max_new_tokens=5) as client:
        r = await client.instruct("Q", w=1, k=5, seed=2)
    assert [(q["n"], q["max_tokens"]) for q in loopback.requests] == [(5, 5)]
    assert r.mode == "bon5"


async def test_generate_many_yields_every_item_once_with_errors_reported() -> None:
    async with ToyCompletionsServer(latency_s=0.01) as server:
        prompts: list = [f"task {i}" for i in range(10)]
        prompts.append([{"role": "assistant", "content": "no user turn"}])
        async with client_for(server, FnScorer(distinct_words), w=2, k=2, l=3, max_new_tokens=6) as client:
            got = [g async for g in client.generate_many(prompts, concurrency=3)]
    assert sorted(g.index for g in got) == list(range(11))
    failed = [g for g in got if g.error is not None]
    assert [g.index for g in failed] == [10] and isinstance(failed[0].error, PromptError)
    assert all(g.result is not None and g.result.steps for g in got if g.error is None)


async def test_client_must_be_opened(loopback: ToyCompletionsServer) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        await client_for(loopback, None).complete("x")


def test_render_chat_rules() -> None:
    cfg = AppConfig.model_validate({"upstream": {"model": "m"}}).upstream
    turns = [{"role": "user", "content": "A {x}"}, {"role": "assistant", "content": "B"},
             {"role": "user", "content": "C"}]
    assert render_chat(turns, cfg) == "Instruction: A {x}\nOutput: B\n\nInstruction: C\nOutput:"  # type: ignore[arg-type]
    for bad, field in [([], "messages"), ([{"role": "bot", "content": "x"}], "messages.0.role"),
                       ([{"role": "user", "content": 3}], "messages.0.content")]:
        with pytest.raises(PromptError, match=field) as caught:
            render_chat(bad, cfg)  # type: ignore[arg-type]
        assert caught.value.param == field


async def test_cli_generate_prints_answer_score_steps_and_tokens(
        loopback: ToyCompletionsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from proxy.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"upstream": {"model": "toy-instruct", "base_url": loopback.base_url},
                                   "search": {"max_new_tokens": 8, "seed": 5}}))
    # main() runs its own event loop: give it a thread so the server keeps serving on ours
    rc = await asyncio.to_thread(main, ["generate", "--config", str(cfg), "--json", "Tell me a story."])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mode"] == "base" and info["steps"] == 1 and info["upstream_calls"] == 1
    assert info["completion_tokens"] <= 8 and info["prompt_tokens"] > 0 and info["text"]
    rc = await asyncio.to_thread(main, ["generate", "--config", str(cfg), "Tell me a story."])
    out = capsys.readouterr().out
    assert rc == 0 and "mode base" in out and "steps 1" in out and "upstream tokens" in out


def test_cli_names_an_unreachable_upstream_and_a_busy_port_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"upstream: {{model: m, base_url: 'http://127.0.0.1:{port}/v1', max_attempts: 1}}\n")
        assert main(["serve", "--config", str(cfg), "--port", str(port)]) == 1
        assert "cannot listen" in capsys.readouterr().err
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    cfg.write_text(f"upstream: {{model: m, base_url: 'http://127.0.0.1:{dead}/v1', max_attempts: 1}}\n")
    assert main(["generate", "--config", str(cfg), "hello"]) == 1
    err = capsys.readouterr().err
    assert "could not be reached" in err and "Traceback" not in err
