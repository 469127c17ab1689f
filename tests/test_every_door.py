"""Every upstream family through every door: the OpenAI-compatible server (`<model>+<mode>`
aliases), the Python client, the CLI and the AlpacaEval runner, over each family's fake, with
base, best-of-N and CBS. What each answer must be: exactly the chunks the API returned, joined."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.alpaca_eval.dataset import Instruction, select
from proxy.alpaca_eval.outputs import OUTPUTS_NAME
from proxy.alpaca_eval.runner import run_alpaca_eval
from proxy.cli import main
from proxy.client import GuidedClient
from proxy.config import AppConfig, SearchConfig
from proxy.search import SearchResult
from proxy.testing.fake_anthropic import FakeAnthropicServer
from proxy.testing.fake_openai_chat import FakeChatServer
from proxy.testing.toy_server import ToyCompletionsServer
from tests.doubles import FnScorer
from tests.test_server import served

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10.0}
MODES = {"bon4": {"w": 1, "k": 4, "max_new_tokens": 12}, "cbs": {"w": 2, "k": 2, "l": 4, "max_new_tokens": 12}}


@asynccontextmanager
async def completions() -> AsyncIterator[dict[str, Any]]:
    async with ToyCompletionsServer() as server:
        yield {"kind": "openai-completions", "model": server.model, "base_url": server.base_url, **FAST}


def chat(dialect: str, **upstream: Any) -> Callable[[], Any]:
    @asynccontextmanager
    async def family() -> AsyncIterator[dict[str, Any]]:
        async with FakeChatServer(dialect, model="org/strong-chat") as server:  # type: ignore[arg-type]
            yield {"kind": "openai-chat", "model": server.model, "base_url": server.base_url, **FAST, **upstream}
    return family


@asynccontextmanager
async def anthropic_messages() -> AsyncIterator[dict[str, Any]]:
    key = "test-anthropic-key"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("W2S_DOORS_ANTHROPIC_KEY", key)
        async with FakeAnthropicServer(api_key=key, models=["claude-opus-4-5"], spacing="trailing",
                                       eos_prob=0.02) as server:  # unseeded: keep an empty answer unlikely
            yield {"kind": "anthropic", "model": "claude-opus-4-5", "base_url": server.base_url,
                   "api_key_env": "W2S_DOORS_ANTHROPIC_KEY", **FAST}


FAMILIES = {
    "completions": completions,
    "vllm-chat": chat("vllm", continuation="continue_final_message"),
    "deepseek-prefix": chat("deepseek", continuation="prefix", supports_n=False,
                            extra_body={"thinking": {"type": "disabled"}}),
    "mistral-prefix": chat("mistral", continuation="prefix", seed_param="random_seed"),
    "anthropic": anthropic_messages,  # answers end in a space: the whitespace seam on every step
}


def score(text: str, finished: bool) -> float:
    return float(len(set(text.split())))


def chunks_joined(r: SearchResult) -> str:
    """The chosen beam rebuilt from the chunks the API returned, root to leaf."""
    path, node = [], r.nodes[r.chosen]
    while node.parent is not None:
        path.append(node.chunk)
        node = r.nodes[node.parent]
    return "".join(reversed(path))


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_client_base_best_of_n_and_cbs(family: str) -> None:
    async with FAMILIES[family]() as upstream:
        cfg = AppConfig.model_validate({"upstream": upstream})
        async with GuidedClient(cfg, scorer=FnScorer(score)) as client:
            results = {name: await client.chat([{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Tell me about the cat."}],
                                               seed=3, **search)
                       for name, search in {"base": {"max_new_tokens": 12}, **MODES}.items()}
            raw = await client.complete("the cat sat on", seed=3, max_new_tokens=8)
    for name, r in {**results, "raw": raw}.items():
        assert r.text == chunks_joined(r), (family, name)  # a single sample may end at once: ""
        assert r.text or name in ("base", "raw"), (family, name)
    assert results["bon4"].score >= min(c.score for c in results["bon4"].nodes.values() if c.step == 1)
    assert len(results["cbs"].steps) >= 2


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_server_aliases_answer_with_every_mode(family: str) -> None:
    async with FAMILIES[family]() as upstream:
        cfg = AppConfig.model_validate({"upstream": upstream, "server": {"modes": MODES, "caps": {"min_l": 4}}})
        model = cfg.upstream.model
        async with served(cfg, scorer=FnScorer(score)) as (srv, client):
            assert {m.id for m in (await client.models.list()).data} >= {model, f"{model}+bon4", f"{model}+cbs"}
            answers = {}
            for alias in (model, f"{model}+bon4", f"{model}+cbs"):
                answers[alias] = await client.chat.completions.create(
                    model=alias, messages=[{"role": "user", "content": "Tell me about the dog."}], seed=5, max_tokens=12)
            streamed = [c async for c in await client.chat.completions.create(
                model=f"{model}+cbs", messages=[{"role": "user", "content": "Tell me about the dog."}], seed=5,
                max_tokens=12, stream=True)]
    for alias, a in answers.items():
        assert a.choices[0].message.content or alias == model, alias  # plain sampling may end at once
        assert a.usage.prompt_tokens > 0, alias
    joined = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    if cfg.upstream.kind == "anthropic":  # no seed: a second search is another draw
        assert joined
    else:  # seeded: the stream says exactly what the whole answer said
        assert joined == answers[f"{model}+cbs"].choices[0].message.content


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_cli_and_alpaca_eval(family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with FAMILIES[family]() as upstream:
        cfg_file = tmp_path / "c.yaml"
        cfg_file.write_text(yaml.safe_dump({"upstream": upstream, "search": {"max_new_tokens": 8, "seed": 1}}))
        # The CLI runs its own event loop: a thread, while this loop serves the fake.
        assert await asyncio.to_thread(main, ["generate", "--config", str(cfg_file), "--json", "Name a colour."]) == 0
        printed = json.loads(capsys.readouterr().out)
        cfg = AppConfig.model_validate({"upstream": upstream, "search": SearchConfig(w=2, k=2, l=4, max_new_tokens=8,
                                                                                     seed=2).model_dump()})
        items = [Instruction(instruction=f"Describe thing number {i}.", dataset="d") for i in range(5)]
        async with GuidedClient(cfg, scorer=FnScorer(score)) as client:
            summary = await run_alpaca_eval(client, select(items, "test"), tmp_path / "run", progress=False)
    rows = json.loads((tmp_path / "run" / OUTPUTS_NAME).read_text())
    assert printed["text"] and printed["upstream_calls"] >= 1
    assert summary.complete and [r["instruction"] for r in rows] == [i.instruction for i in items]
    assert all(r["output"] for r in rows)
