"""`w2s serve-local`: a real transformers model behind the completions protocol."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import openai
import pytest
from tiny_models import TinyModelDirs

from proxy.config import ModelSpec
from proxy.local.server import LocalCompletionsServer
from proxy.local.causal_lm import LocalCausalLM


@pytest.fixture
async def served(tiny_model_dirs: TinyModelDirs) -> AsyncIterator[tuple[openai.AsyncOpenAI, LocalCausalLM]]:
    lm = LocalCausalLM.load(ModelSpec(path=str(tiny_model_dirs.llama_tuned)), "cpu", "float32")
    async with LocalCompletionsServer(lm, model="tiny") as server:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
            yield client, lm
    lm.close()


async def test_n_max_tokens_usage_and_finish_reasons(served: tuple[openai.AsyncOpenAI, LocalCausalLM]) -> None:
    client, lm = served
    r = await client.completions.create(model="tiny", prompt="Once upon a time", n=3, max_tokens=6,
                                        temperature=1.0, seed=1)
    assert len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2]
    prompt_ids = lm.tokenizer("Once upon a time")["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    ran_out = sum(c.finish_reason == "length" for c in r.choices)
    # a length finish is exactly max_tokens generated tokens; an EOS finish is fewer
    assert 6 * ran_out <= r.usage.completion_tokens <= 6 * ran_out + 5 * (3 - ran_out)


async def test_seed_reproduces_and_temperature_zero_is_greedy(served: tuple[openai.AsyncOpenAI, LocalCausalLM]) -> None:
    client, _ = served
    args = dict(model="tiny", prompt="The cat", n=2, max_tokens=8, temperature=1.0)
    a = await client.completions.create(seed=5, **args)
    b = await client.completions.create(seed=5, **args)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    g1 = await client.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0)
    g2 = await client.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0, seed=99)
    assert g1.choices[0].text == g2.choices[0].text


async def test_stop_sequences_cut_the_text(served: tuple[openai.AsyncOpenAI, LocalCausalLM]) -> None:
    client, _ = served
    full = await client.completions.create(model="tiny", prompt="A", max_tokens=12, temperature=0)
    text = full.choices[0].text
    if len(text.strip()) < 2:
        pytest.skip("the greedy sample is too short to cut")
    stop = text.strip()[1:3]
    cut = await client.completions.create(model="tiny", prompt="A", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]


async def test_bad_requests_are_refused_in_openai_shape(served: tuple[openai.AsyncOpenAI, LocalCausalLM]) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model="tiny", prompt="A", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"  # type: ignore[index]


def default_sigint() -> None:
    """A shell that starts a job in the background (`cmd &`) has it ignore SIGINT, and children
    inherit that: give the server the default disposition, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_local_command_serves_until_interrupted(tiny_model_dirs: TinyModelDirs) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve-local", str(tiny_model_dirs.llama_tuned),
                             "--name", "tiny", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("serving ") and "http://127.0.0.1:" in line
        base_url = line.split(" at ")[1].strip()

        async def ask() -> str:
            async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
                models = await client.models.list()
                r = await client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
                return models.data[0].id + ":" + str(r.usage.completion_tokens <= 3)

        assert asyncio.run(ask()) == "tiny:True"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) in (0, 130)  # generous: a loaded CI box is slow to shut torch down
