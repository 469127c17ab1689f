"""Shared fixtures: a loopback OpenAI completions server and upstream configs pointing at it."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.config import AppConfig, OpenAICompletionsConfig
from proxy.testing.toy_server import ToyCompletionsServer
# The real vLLM servers (the session's, and one with chunked prefill for the test that kills it);
# the collection hook starts each beside the first tests (half a minute to several on a fresh
# machine) when a selected test needs it.
from tests.vllm_engine import pytest_collection_finish, vllm_chunked_prefill_server, vllm_server  # noqa: F401
from tiny_models import (  # noqa: F401  (fixtures for every test module)
    llama_pair,
    mixed_pair,
    tiny_mixed_scorer_config,
    tiny_model_dirs,
    tiny_scorer_config,
)


@pytest.fixture
async def loopback() -> AsyncIterator[ToyCompletionsServer]:
    async with ToyCompletionsServer() as server:
        yield server


def upstream_config(server: ToyCompletionsServer, **kw: object) -> OpenAICompletionsConfig:
    """An upstream on the loopback server with fast retries (tests must not sleep for long)."""
    base = dict(model="toy-instruct", base_url=server.base_url, backoff_initial_s=0.01, backoff_max_s=0.05,
                timeout_s=10.0)
    base.update(kw)
    return OpenAICompletionsConfig.model_validate(base)


def on_any_port(cfg: AppConfig) -> AppConfig:
    """`cfg` with the guidance server on an ephemeral port: a test never takes 8000 (the
    default) from a server a developer is running, nor from a second test run."""
    return cfg.model_copy(update={"server": cfg.server.model_copy(update={"port": 0})})
