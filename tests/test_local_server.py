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

import torch

from proxy.cli import build_parser
from proxy.config import ModelSpec
from proxy.local import causal_lm
from proxy.local.backend import CompletionParams
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


Logits = dict[tuple[tuple[int, ...], int], list[torch.Tensor]]
"""Per sampled row, keyed by (prompt ids, the row's seed): the logits of each step, in order."""


class LogitsSeen:
    """Records the logits every row is sampled from, where serve-local samples (`_RowSampler`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: Logits = {}
        sample = causal_lm._RowSampler.__call__

        def record(sampler: causal_lm._RowSampler, input_ids: torch.LongTensor,
                   scores: torch.FloatTensor) -> torch.FloatTensor:
            for i, row in enumerate(sampler.rows):
                key = (tuple(row.prompt_ids), row.generator.initial_seed())
                self.rows.setdefault(key, []).append(scores[i].clone())
            return sample(sampler, input_ids, scores)

        monkeypatch.setattr(causal_lm._RowSampler, "__call__", record)

    def take(self) -> Logits:
        rows, self.rows = self.rows, {}
        return rows


TARGET = CompletionParams(model="tiny", prompt="The cat sat", n=3, max_tokens=8, seed=5)
COMPANY = (CompletionParams(model="tiny", prompt="A much longer prompt about a dog that ran far away. " * 3, n=5,
                            max_tokens=12, seed=7),
           CompletionParams(model="tiny", prompt="Hi", n=2, max_tokens=4, seed=9))


async def alone_then_in_company(lm: LocalCausalLM, seen: LogitsSeen) -> tuple[Logits, Logits, list[str], list[str], int]:
    """TARGET's logits and texts sent alone, then sent with two other requests at once, and how
    many batches the second round took."""
    alone = [c.text for c in (await lm.complete(TARGET))[0]]
    alone_logits = seen.take()
    before = lm.batches
    _, (choices, _), _ = await asyncio.gather(lm.complete(COMPANY[0]), lm.complete(TARGET), lm.complete(COMPANY[1]))
    shared_logits = {k: v for k, v in seen.take().items() if k in alone_logits}
    return alone_logits, shared_logits, alone, [c.text for c in choices], lm.batches - before


def bit_identical(a: Logits, b: Logits) -> bool:
    return a.keys() == b.keys() and all(len(a[k]) <= len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
                                        for k in a)


async def test_one_row_batches_give_a_seeded_request_bit_identical_logits_whatever_else_is_served(
        tiny_model_dirs: TinyModelDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = LogitsSeen(monkeypatch)
    spec = ModelSpec(path=str(tiny_model_dirs.llama_tuned))
    shared = LocalCausalLM.load(spec, "cpu", "float32")
    try:  # the default: the three requests share one padded batch, which rounds TARGET's logits otherwise
        alone, together, _, _, batches = await alone_then_in_company(shared, seen)
    finally:
        shared.close()
    assert batches == 1 and len(alone) == TARGET.n
    assert not bit_identical(alone, together)
    exact = LocalCausalLM.load(spec, "cpu", "float32", max_batch_rows=1)
    try:  # one request a batch: the same shapes every time, so the same numbers
        alone, together, texts_alone, texts_together, batches = await alone_then_in_company(exact, seen)
    finally:
        exact.close()
    assert batches == 3 and len(alone) == TARGET.n
    assert bit_identical(alone, together) and texts_alone == texts_together


@pytest.mark.parametrize("rows", ["0", "-3", "two", "1.5"])
def test_a_bad_batch_size_is_refused_before_any_model_loads(rows: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve-local", "no-such-model", "--max-batch-rows", rows])
    assert exit_.value.code == 2
    assert f"--max-batch-rows: must be a whole number of rows, at least 1 (got {rows!r})" in capsys.readouterr().err


def default_sigint() -> None:
    """A shell that starts a job in the background (`cmd &`) has it ignore SIGINT, and children
    inherit that: give the server the default disposition, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_local_command_serves_until_interrupted(tiny_model_dirs: TinyModelDirs) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve-local", str(tiny_model_dirs.llama_tuned),
                             "--name", "tiny", "--port", "0", "--device", "cpu", "--max-batch-rows", "1"],
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
