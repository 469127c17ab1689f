"""The guidance server's life: readiness while the scorer loads, a real (tiny) scorer loaded at
startup off the event loop, /metrics against the traffic that produced it, and `w2s serve`."""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import TinyModelDirs, cpu_scorer_config

from proxy.client import GuidedClient
from proxy.config import AppConfig, OpenAICompletionsConfig, ScorerConfig, SearchConfig
from proxy.serving.app import GuidanceServer
from proxy.testing.toy_server import ToyCompletionsServer
from scorers.base import ScorerContextError
from tests.conftest import upstream_config
from tests.doubles import FnScorer
from tests.test_server import MODEL, app_config, distinct_words, metric, root, served, wait_for

REPO = Path(__file__).resolve().parent.parent


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await (r.json() if r.content_type == "application/json" else r.text())


def fake_scorer_config() -> ScorerConfig:
    return ScorerConfig.model_validate({"tuned": {"path": "tuned"}, "untuned": {"path": "untuned"}})


async def test_readiness_follows_the_scorer_load(loopback: ToyCompletionsServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    loaded = FnScorer(distinct_words)

    def slow_load(cfg: ScorerConfig) -> FnScorer:  # runs on the worker thread, like the real loader
        release.wait(10)
        return loaded

    monkeypatch.setattr("scorers.registry.load_scorer", slow_load)
    cfg = AppConfig(upstream=upstream_config(loopback), scorer=fake_scorer_config())
    async with served(cfg) as (srv, client):
        alive = await get(root(srv) + "/health")
        loading = await get(root(srv) + "/health/ready")
        with pytest.raises(openai.APIStatusError) as e:
            await client.completions.create(model=f"{MODEL}+bon4", prompt="x")
        plain = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)  # needs no scorer
        release.set()
        await srv.wait_ready()
        ready = await get(root(srv) + "/health/ready")
        guided = await client.completions.create(model=f"{MODEL}+bon4", prompt="x", max_tokens=3)
    assert alive == (200, {"status": "alive"})
    assert loading == (503, {"status": "not ready", "scorer": "loading", "upstream": "reachable"})
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "5"
    assert e.value.body["message"] == "guided modes are unavailable: the scorer is still loading"
    assert plain.choices and ready == (200, {"status": "ready", "scorer": "loaded", "upstream": "reachable"})
    assert guided.model_extra["w2s"]["mode"] == "bon4" and len(loaded.calls) == 1


async def test_a_failed_load_and_an_unreachable_upstream_are_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_load(cfg: ScorerConfig) -> None:
        raise OSError("tuned: no such model directory")

    monkeypatch.setattr("scorers.registry.load_scorer", broken_load)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    up = OpenAICompletionsConfig(model=MODEL, base_url=f"http://127.0.0.1:{port}/v1", max_attempts=1)
    async with served(AppConfig(upstream=up, scorer=fake_scorer_config())) as (srv, client):
        with pytest.raises(RuntimeError, match=r"failed: OSError \(see the server log\)"):
            await srv.wait_ready()
        status, body = await get(root(srv) + "/health/ready")
        with pytest.raises(openai.APIStatusError) as guided:
            await client.completions.create(model=f"{MODEL}+bon4", prompt="x")
        with pytest.raises(openai.APIStatusError) as plain:
            await client.completions.create(model=MODEL, prompt="x")
    assert status == 503 and body == {"status": "not ready", "upstream": "unreachable: APIConnectionError",
                                      "scorer": "failed: OSError (see the server log)"}
    assert guided.value.status_code == 503 and "failed: OSError" in guided.value.body["message"]
    assert "no such model directory" not in guided.value.body["message"]  # may hold local paths
    assert plain.value.status_code == 502
    assert plain.value.body["message"] == "The upstream could not be reached (after retries)."


async def test_real_tiny_scorer_loaded_at_startup_guides_the_answer(
        loopback: ToyCompletionsServer, tiny_model_dirs: TinyModelDirs) -> None:  # noqa: F811
    scorer_cfg = cpu_scorer_config(tiny_model_dirs.llama_tuned, tiny_model_dirs.llama_untuned,
                                   attn_implementation="eager")
    cfg = AppConfig(upstream=upstream_config(loopback), scorer=scorer_cfg, search=SearchConfig(max_new_tokens=12))
    messages = [{"role": "user", "content": "Write about the sea."}]
    async with served(cfg) as (srv, client):
        await srv.wait_ready()
        r = await client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                 seed=21, extra_body={"w2s": {"w": 2, "k": 2, "l": 8}})
    # independently: a freshly loaded scorer, the same search in-process
    async with GuidedClient(cfg) as guided:
        ref = await guided.chat(messages, w=2, k=2, l=8, seed=21)  # type: ignore[arg-type]
        session = guided.scorer.open(messages)  # type: ignore[union-attr]
        [rescored] = await session.score([ref.text], [ref.finished])
        session.close()
    w2s = r.model_extra["w2s"]
    assert r.choices[0].message.content == ref.text.lstrip() and w2s["steps"] == len(ref.steps) >= 2
    assert w2s["score"] == pytest.approx(ref.score, abs=1e-6) and rescored == pytest.approx(w2s["score"], abs=1e-4)


async def test_what_cannot_fit_the_guides_context_is_refused_before_the_upstream_is_paid(
        loopback: ToyCompletionsServer, tiny_model_dirs: TinyModelDirs) -> None:  # noqa: F811
    """The tiny guides position 512 tokens: a longer prompt, or an answer that could not fit after
    the prompt, is a 400 naming the field, streamed or not, and the upstream never hears of it."""
    scorer_cfg = cpu_scorer_config(tiny_model_dirs.llama_tuned, tiny_model_dirs.llama_untuned)
    cfg = AppConfig(upstream=upstream_config(loopback), scorer=scorer_cfg, search=SearchConfig(max_new_tokens=12),
                    server={"port": 0, "caps": {"max_tokens": 4096}})
    long_text = " ".join(["the cat sat on the mat"] * 150)
    async with served(cfg) as (srv, client):
        await srv.wait_ready()
        refusals = []
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as long_prompt:
                await client.completions.create(model=f"{MODEL}+bon4", prompt=long_text, stream=stream)
            with pytest.raises(openai.BadRequestError) as long_chat:
                await client.chat.completions.create(model=f"{MODEL}+bon4", stream=stream,
                                                     messages=[{"role": "user", "content": long_text}])
            with pytest.raises(openai.BadRequestError) as long_answer:
                await client.completions.create(model=f"{MODEL}+bon4", prompt="hi", max_tokens=600, stream=stream)
            refusals += [long_prompt.value.body, long_chat.value.body, long_answer.value.body]
        fits = await client.completions.create(model=f"{MODEL}+bon4", prompt="hi", max_tokens=400)
    sent = len(loopback.requests)
    async with GuidedClient(cfg) as guided:  # the same rule in-process: the search checks before it calls
        with pytest.raises(ScorerContextError, match="fills the guide's context"):
            await guided.instruct(long_text, w=1, k=4)
    assert len(loopback.requests) == sent
    assert [r["param"] for r in refusals] == ["prompt", "messages", "max_tokens"] * 2
    assert {r["code"] for r in refusals} == {"context_length_exceeded"}
    assert "at most" in refusals[2]["message"]
    assert len(loopback.requests) >= 1 and all(r["prompt"] != long_text for r in loopback.requests)
    assert fits.choices


async def test_metrics_add_up_to_the_traffic(loopback: ToyCompletionsServer) -> None:
    scorer = FnScorer(distinct_words)
    cfg = AppConfig(upstream=upstream_config(loopback, prices={"prompt": 1.5, "completion": 2.0}))
    async with served(cfg, scorer=scorer) as (srv, client):
        answers = [
            await client.completions.create(model=MODEL, prompt="a", max_tokens=6, seed=1),
            await client.completions.create(model=f"{MODEL}+cbs-w2k2l30", prompt="b", max_tokens=20, seed=2,
                                            extra_body={"w2s": {"l": 8}}),
            await client.chat.completions.create(model=f"{MODEL}+bon4", max_tokens=9, seed=3,
                                                 messages=[{"role": "user", "content": "c"}]),
        ]
        for bad in ({"model": "nope"}, {"model": MODEL, "n": 3}):
            with pytest.raises(openai.APIStatusError):
                await client.completions.create(prompt="x", **bad)  # type: ignore[call-overload]
        status, text = await get(root(srv) + "/metrics")
    assert status == 200
    info = [a.model_extra["w2s"] for a in answers]
    prompt_tokens = sum(a.usage.prompt_tokens for a in answers)
    completion_tokens = sum(a.usage.completion_tokens for a in answers)
    scored = [t for call in scorer.calls for t in call.texts]
    assert metric(text, "w2s_upstream_calls_total") == sum(i["upstream_calls"] for i in info) == loopback.completed
    assert metric(text, "w2s_upstream_tokens_total", kind="prompt_uncached") == prompt_tokens
    assert metric(text, "w2s_upstream_tokens_total", kind="completion") == completion_tokens
    assert metric(text, "w2s_upstream_cost_usd_total") == pytest.approx(
        (prompt_tokens * 1.5 + completion_tokens * 2.0) / 1e6)
    assert metric(text, "w2s_search_steps_total") == sum(i["steps"] for i in info)
    assert metric(text, "w2s_scored_candidates_total") == len(scored)
    # every loopback word is one upstream token
    assert metric(text, "w2s_scored_tokens_total") == sum(len(t.split()) for t in scored)
    assert metric(text, "w2s_requests_total", endpoint="/v1/completions", status="200") == 2
    assert metric(text, "w2s_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert metric(text, "w2s_requests_total", endpoint="/v1/completions", status="404") == 1
    assert metric(text, "w2s_requests_total", endpoint="/v1/completions", status="400") == 1
    assert metric(text, "w2s_request_duration_seconds_count", endpoint="/v1/completions") == 4
    finished = sum(1 for i in info if i["finished"])
    assert metric(text, "w2s_searches_total", outcome="finished") == finished
    assert metric(text, "w2s_step_scoring_seconds_count") == sum(i["steps"] for i in info[1:])
    assert metric(text, "w2s_generations_in_flight") == 0
    # by mode: plain sampling, a served mode, and one whose L the request changed ("custom")
    for answer, mode in zip(answers, ("base", "custom", "bon4")):
        assert answer.usage is not None
        assert metric(text, "w2s_upstream_tokens_total", mode=mode,
                      kind="prompt_uncached") == answer.usage.prompt_tokens
        assert metric(text, "w2s_upstream_cost_usd_total", mode=mode) == pytest.approx(
            (answer.usage.prompt_tokens * 1.5 + answer.usage.completion_tokens * 2.0) / 1e6)
        assert metric(text, "w2s_searches_total", mode=mode) == 1


async def test_metrics_count_upstream_retries_and_failures_by_kind(loopback: ToyCompletionsServer) -> None:
    cfg = AppConfig(upstream=upstream_config(loopback, max_attempts=2, prices={"prompt": 1.5, "completion": 2.0}))
    async with served(cfg, scorer=FnScorer(distinct_words)) as (srv, client):
        loopback.failures.extend([429, 503, 500])  # gives up after 429, 503; then 500 once, retried
        with pytest.raises(openai.APIStatusError) as e:
            await client.completions.create(model=MODEL, prompt="a", max_tokens=4)
        answer = await client.completions.create(model=f"{MODEL}+bon4", prompt="b", max_tokens=4, seed=1)
        async with aiohttp.ClientSession() as s:
            async with s.get(root(srv) + "/metrics") as r:
                content_type, text = r.headers["Content-Type"], await r.text()
            async with s.get(root(srv) + "/metrics",
                             headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as r:
                openmetrics_type, openmetrics_text = r.headers["Content-Type"], await r.text()
    assert e.value.status_code == 502 and answer.choices and len(loopback.requests) == 4
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}  # what a Prometheus server reads
    assert {"w2s_upstream_retries", "w2s_upstream_errors", "w2s_searches", "w2s_upstream_cost_usd"} <= families.keys()
    assert metric(text, "w2s_upstream_retries_total", kind="http_429") == 1
    assert metric(text, "w2s_upstream_retries_total", kind="http_500") == 1
    assert metric(text, "w2s_upstream_retries_total") == 2
    assert metric(text, "w2s_upstream_errors_total", kind="http_503") == 1
    assert metric(text, "w2s_upstream_errors_total") == 1
    assert metric(text, "w2s_searches_total", mode="base", outcome="error") == 1
    assert metric(text, "w2s_searches_total", mode="bon4", outcome="error") == 0
    assert metric(text, "w2s_searches_total", mode="bon4") == 1
    assert answer.usage is not None
    assert metric(text, "w2s_upstream_tokens_total", mode="bon4", kind="completion") == answer.usage.completion_tokens
    assert metric(text, "w2s_upstream_tokens_total", mode="base") == 0  # the failed search was billed nothing
    assert metric(text, "w2s_upstream_cost_usd_total", mode="bon4") == pytest.approx(
        (answer.usage.prompt_tokens * 1.5 + answer.usage.completion_tokens * 2.0) / 1e6)
    assert openmetrics_type.startswith("application/openmetrics-text") and openmetrics_text.endswith("# EOF\n")
    om = {f.name: f for f in openmetrics_families(openmetrics_text)}
    assert [s.value for s in om["w2s_upstream_errors"].samples
            if s.name == "w2s_upstream_errors_total" and s.labels == {"kind": "http_503"}] == [1]


def default_sigint() -> None:
    """A background job of a shell (`cmd &`) ignores SIGINT and its children inherit that; the
    server under test gets the default disposition, as from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class ServeProcess:
    """A `w2s serve` process: where it serves, and (once it has exited) what it wrote."""

    proc: asyncio.subprocess.Process
    first_line: str
    out: bytes = b""
    err: bytes = b""

    @property
    def base_url(self) -> str:
        return self.first_line.split()[2]


@asynccontextmanager
async def w2s_serve(tmp_path: Path, config: dict[str, Any], *, interrupt: bool = False,
                    exit_within_s: float = 120.0) -> AsyncIterator[ServeProcess]:
    """`w2s serve` on `config` (written to a file) on a free port, once it says where it serves.
    On leaving: SIGINT first with `interrupt` (else the test stopped it), then its exit awaited
    (killed after `exit_within_s`, generous for a loaded box) and its output kept."""
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "serve", "--config", str(path), "--port", "0", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=default_sigint)
    served: ServeProcess | None = None
    try:
        assert proc.stdout is not None
        served = ServeProcess(proc, (await asyncio.wait_for(proc.stdout.readline(), 60)).decode())
        yield served
    finally:
        if interrupt and proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:  # after a SIGTERM it stops by itself; a second signal would race its exit
            out, err = await asyncio.wait_for(proc.communicate(), exit_within_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if served is not None:
            served.out, served.err = out, err


async def streamed(base_url: str) -> str:
    """A streamed completion's whole body, read raw."""
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/completions", json={
                "model": MODEL, "prompt": "yo", "max_tokens": 3, "stream": True}) as r:
            return (await r.read()).decode()


async def test_w2s_serve_command(loopback: ToyCompletionsServer, tmp_path: Path) -> None:
    config = {"upstream": {"model": MODEL, "base_url": loopback.base_url}, "server": {"modes": {"b2": "bon4"}}}
    async with w2s_serve(tmp_path, config, interrupt=True) as served:
        line = served.first_line
        assert line.startswith("w2s: serving http://127.0.0.1:") and line.rstrip().endswith(f"models: {MODEL}")
        async with openai.AsyncOpenAI(base_url=served.base_url, api_key="x", max_retries=0) as client:
            r = await client.completions.create(model=MODEL, prompt="hello", max_tokens=3, seed=1)
        assert r.choices and loopback.requests[-1]["prompt"] == "hello"
    assert served.proc.returncode == 130 and b"Traceback" not in served.err


async def test_w2s_serve_drains_on_sigterm(tmp_path: Path) -> None:
    """Requests in flight when SIGTERM arrives, whole and streamed, still get their answers (the
    stream to its [DONE]); then the process exits 0 as soon as they are done, not at the end of
    its grace period (30 s here; the client's keep-alive connection still open)."""
    grace_s = 30.0
    loop = asyncio.get_running_loop()
    config = {"upstream": {"model": MODEL}, "server": {"shutdown_grace_s": grace_s}}
    async with ToyCompletionsServer(latency_s=1.0) as slow:
        config["upstream"]["base_url"] = slow.base_url
        async with w2s_serve(tmp_path, config) as served:
            proc, base_url = served.proc, served.base_url
            async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
                pending = asyncio.create_task(client.completions.create(model=MODEL, prompt="hi", max_tokens=3))
                streaming = asyncio.create_task(streamed(base_url))
                await wait_for(lambda: slow.in_flight == 2, "both requests to reach the upstream", limit_s=60)
                proc.send_signal(signal.SIGTERM)
                answer = await asyncio.wait_for(pending, 60)
                stream_text = await asyncio.wait_for(streaming, 60)
                answered = loop.time()
                await asyncio.wait_for(proc.wait(), grace_s)
                exit_after_s = loop.time() - answered
    out, err = served.out, served.err
    assert answer.choices and answer.choices[0].finish_reason in ("stop", "length")
    assert stream_text.rstrip().endswith("data: [DONE]") and '"error"' not in stream_text
    assert proc.returncode == 0 and b"draining" in out and b"Traceback" not in err
    assert exit_after_s < grace_s / 3, f"exited {exit_after_s:.1f}s after the last answer (grace {grace_s}s)"


async def test_a_stream_still_running_when_the_grace_period_ends_gets_an_error_event() -> None:
    async with ToyCompletionsServer(latency_s=5.0) as slow:
        server = GuidanceServer(app_config(slow), shutdown_timeout_s=0.3)
        await server.start(port=0)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(server.base_url + "/completions", json={
                        "model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}) as r:
                    await wait_for(lambda: slow.in_flight == 1, "the request to reach the upstream", limit_s=30)
                    stopping = asyncio.create_task(server.stop())
                    body = (await r.read()).decode()
                    await stopping
        finally:
            await server.stop()
    last = [e for e in body.split("\n\n") if e][-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "server_shutting_down"


async def test_whole_answers_still_running_when_the_grace_period_ends_get_a_503_in_time() -> None:
    """Non-streamed requests that outlive the grace period are each answered (a 503 the client
    can retry, like a stream's error event) before the server stops, and the server stops within
    its grace period, not aiohttp's two (a wait, then a cancellation that answers nothing)."""
    grace_s = 2.0
    async with ToyCompletionsServer(latency_s=60.0) as slow:
        server = GuidanceServer(app_config(slow), shutdown_timeout_s=grace_s)
        await server.start(port=0)
        loop = asyncio.get_running_loop()
        try:
            async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                                          timeout=30) as client:
                async def answer(i: int) -> BaseException | None:
                    try:
                        if i % 2:
                            await client.chat.completions.create(model=MODEL, max_tokens=3,
                                                                 messages=[{"role": "user", "content": f"q{i}"}])
                        else:
                            await client.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=3)
                    except Exception as e:  # noqa: BLE001 - what each request got is the result
                        return e
                    return None

                requests = [asyncio.create_task(answer(i)) for i in range(4)]
                await wait_for(lambda: slow.in_flight == 4, "the requests to reach the upstream", limit_s=30)
                t0 = loop.time()
                await asyncio.wait_for(server.stop(), 4 * grace_s)
                stop_s = loop.time() - t0
                outcomes = await asyncio.wait_for(asyncio.gather(*requests), 30)
            await wait_for(lambda: slow.in_flight == 0, "the upstream requests to be cancelled", limit_s=10)
        finally:
            await server.stop()
    for e in outcomes:
        assert isinstance(e, openai.APIStatusError), repr(e)
        assert e.status_code == 503 and e.body["code"] == "server_shutting_down"  # type: ignore[index]
        assert e.body["type"] == "server_error" and "send it again" in e.body["message"]  # type: ignore[index]
    assert stop_s < 1.5 * grace_s  # today: 2 x grace, and every connection cut without an answer


async def test_w2s_serve_answers_everything_and_exits_within_its_grace_period_on_sigterm(tmp_path: Path) -> None:
    """The process end to end, its grace period set in the config file: requests that would
    outlive it, whole and streamed, each get `server_shutting_down` (a 503, or the stream's error
    event) and the process exits 0 within the grace period, not twice it."""
    grace_s = 2.0  # server.shutdown_grace_s, 10 s unless set
    config = {"upstream": {"model": MODEL}, "server": {"shutdown_grace_s": grace_s}}
    loop = asyncio.get_running_loop()
    async with ToyCompletionsServer(latency_s=120.0) as slow:
        config["upstream"]["base_url"] = slow.base_url
        async with w2s_serve(tmp_path, config, exit_within_s=10) as served:
            proc, base_url = served.proc, served.base_url
            async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60) as client:
                async def whole(i: int) -> BaseException | None:
                    try:
                        await client.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=3)
                    except Exception as e:  # noqa: BLE001 - what each request got is the result
                        return e
                    return None

                wholes = [asyncio.create_task(whole(i)) for i in range(3)]
                streaming = asyncio.create_task(streamed(base_url))
                await wait_for(lambda: slow.in_flight == 4, "the requests to reach the upstream", limit_s=60)
                proc.send_signal(signal.SIGTERM)
                t0 = loop.time()
                async with asyncio.timeout_at(t0 + 2 * grace_s):  # before: cut unanswered at ~2 x grace
                    outcomes = await asyncio.gather(*wholes)
                    stream_text = await streaming
                    await proc.wait()
                exit_s = loop.time() - t0
    out, err = served.out, served.err
    for e in outcomes:
        assert isinstance(e, openai.APIStatusError), repr(e)
        assert e.status_code == 503 and e.body["code"] == "server_shutting_down"  # type: ignore[index]
    last = [e for e in stream_text.split("\n\n") if e][-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "server_shutting_down"
    assert proc.returncode == 0 and b"draining" in out and b"Traceback" not in err
    assert exit_s < 1.5 * grace_s  # before: the connections cut at ~2 x grace, the exit after that
