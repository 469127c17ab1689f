"""The remote scorer against a real vLLM (its CPU build, SmolLM2-135M-Instruct in float32;
tests/vllm_engine.py starts it, or skips with the reason): on the same weights its scores equal
the local scorer's, across chunk seams, with and without EOS, on chat-templated prompts; and two
`w2s serve` processes over that one engine answer the same seeded requests the same way, since
nothing lives in a replica but tokenizers.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.config import ScorerConfig
from scorers.implicit import ImplicitRewardScorer
from scorers.registry import load_scorer, open_scorer
from scorers.remote import RemoteScorer
from tests.vllm_engine import VllmServer

pytestmark = pytest.mark.slow
log = logging.getLogger("w2s.tests.remote")

REPO = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "Describe a quiet morning by the sea in three sentences."}]
WARM = "You are a warm, cheerful assistant who loves the sea."
SMOL_TEMPLATE = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
FLOAT32_TOLERANCE = 5e-4
"""On a sum over up to ~100 tokens: the engine's and transformers' float32 kernels differ by
about 1e-6 per token (measured: at most 4e-5 on a sum)."""


def sides(server: VllmServer) -> dict[str, Any]:
    """A prompt-contrast pair on one engine: SmolLM2 with a warm system turn vs SmolLM2 itself
    (the tokenizer's own ChatML template on both sides)."""
    path = str(server.model_dir)
    engine = {"base_url": server.base_url, "model": server.model, "timeout_s": 120}
    return {"tuned": {"path": path, "system_prompt": WARM, "engine": engine},
            "untuned": {"path": path, "system_prompt": None, "engine": engine}}


@pytest.fixture
async def scorers(vllm_server: VllmServer) -> AsyncIterator[tuple[ImplicitRewardScorer, RemoteScorer]]:
    pair = sides(vllm_server)
    remote = await open_scorer(ScorerConfig.model_validate({"kind": "remote", **pair}))
    local_pair = {k: {f: v for f, v in spec.items() if f != "engine"} for k, spec in pair.items()}
    local = await asyncio.to_thread(load_scorer, ScorerConfig.model_validate(
        {**local_pair, "device": "cpu", "dtype": "float32", "attn_implementation": "eager"}))
    assert isinstance(remote, RemoteScorer) and isinstance(local, ImplicitRewardScorer)
    yield local, remote
    await remote.aclose()
    await local.aclose()


SEAMS = {
    "inside a word": lambda text, i: text[i - 1].isalnum() and text[i].isalnum(),
    "before a space": lambda text, i: text[i] == " ",
    "after a space": lambda text, i: text[i - 1] == " ",
    "before punctuation": lambda text, i: text[i] in ",.;:!?'\")",
}
"""Where a chunk can end, and so where the scorers' seam between prompt + response tokens moves."""


def seam_cuts(text: str, per_kind: int = 3) -> list[str]:
    """Prefixes of `text` ending at every kind of seam, `per_kind` of each spread over the text
    (the whole text last): each kind is met at a few places rather than wherever a fixed stride
    happens to land, and the engine re-scores fewer sequences."""
    cuts: set[int] = set()
    for kind, at in SEAMS.items():
        spots = [i for i in range(1, len(text)) if at(text, i)]
        assert spots, f"the answer has no seam {kind}: {text!r}"
        cuts.update(spots[len(spots) * (j + 1) // (per_kind + 1)] for j in range(min(per_kind, len(spots))))
    return [text[:i] for i in sorted(cuts)] + [text]


async def greedy_answer(server: VllmServer) -> str:
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120) as client:
        r = await client.chat.completions.create(model=server.model, messages=QUESTION,  # type: ignore[arg-type]
                                                 max_tokens=64, temperature=0.0)
    text = r.choices[0].message.content or ""
    assert len(text) > 40
    return text


async def test_remote_equals_local_in_float32(vllm_server: VllmServer,
                                              scorers: tuple[ImplicitRewardScorer, RemoteScorer]) -> None:
    local, remote = scorers
    answer = await greedy_answer(vllm_server)
    cuts = seam_cuts(answer)
    odd = ["Café ☕ — naïve 😊 résumé", "  two leading spaces", "trailing space ", "line\nbreak\n"]
    texts = cuts + odd
    worst = 0.0
    with local.open(QUESTION) as a, remote.open(QUESTION) as b:
        for flags in ([False] * len(texts), [True] * len(texts)):  # without and with the EOS term
            want, got = await a.score(texts, flags), await b.score(texts, flags)
            assert got == pytest.approx(want, abs=FLOAT32_TOLERANCE)
            worst = max([worst] + [abs(x - y) for x, y in zip(got, want)])
    log.info("remote vs local, float32, %d texts: largest difference %.2e", len(texts), worst)
    assert len({round(x, 3) for x in want}) > 1  # real, differing numbers


async def serve(config: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", "0", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
    assert line.startswith("w2s: serving http://127.0.0.1:"), line
    base_url = line.split()[2]
    ready = base_url.removesuffix("/v1") + "/health/ready"
    async with aiohttp.ClientSession() as http:
        for _ in range(240):  # the scorer loads its tokenizers and asks the engine (a few seconds)
            async with http.get(ready) as r:
                if r.status == 200:
                    return proc, base_url
            await asyncio.sleep(0.5)
    raise AssertionError(f"{base_url}: the scorer was not ready within 120 s")


async def test_two_replicas_over_one_engine_answer_alike(vllm_server: VllmServer, tmp_path: Path) -> None:
    """Two `w2s serve` processes, the engine as upstream and as both sides of the scorer: the
    same seeded requests get the same answers from either replica, whichever served them."""
    config = tmp_path / "replica.yaml"
    config.write_text(yaml.safe_dump({
        "upstream": {"model": vllm_server.model, "base_url": vllm_server.base_url, "api_key_env": "W2S_TEST_VLLM_API_KEY",
                     "prompt_template": SMOL_TEMPLATE, "hold_trailing_whitespace": True, "timeout_s": 120},
        "scorer": {"kind": "remote", **sides(vllm_server)},
        "server": {"modes": {"cbs": {"w": 2, "k": 2, "l": 8}}},
    }))
    started = await asyncio.gather(serve(config), serve(config), return_exceptions=True)  # side by side
    procs = [p for p in started if not isinstance(p, BaseException)]
    try:
        for failed in (p for p in started if isinstance(p, BaseException)):
            raise failed
        requests = [dict(prompt=p, max_tokens=16, temperature=0.8, seed=s)
                    for p, s in (("Write one line about the sea.", 3), ("Name a good breakfast.", 4))]
        answers: list[list[tuple[str, Any]]] = []
        for _, url in procs:
            async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=300) as client:
                replies = await asyncio.gather(*(client.completions.create(model=f"{vllm_server.model}+cbs", **r)
                                                 for r in requests))
            answers.append([(c.choices[0].text, (c.model_extra or {})["w2s"]["score"]) for c in replies])
        (a, b) = answers
        assert [t for t, _ in a] == [t for t, _ in b] and any(t for t, _ in a)
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=FLOAT32_TOLERANCE)
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            _, err = await asyncio.wait_for(proc.communicate(), 120)
            assert b"Traceback" not in err, err.decode()[-2000:]
