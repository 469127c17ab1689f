"""The guidance server against an upstream that misbehaves in every way the toy server knows.

Faults (proxy.testing.toy_server): 429 with Retry-After, 500, 503, hangs past the upstream
timeout, connection resets, bodies cut short on the wire, malformed and truncated JSON, 200s
with no choices or an empty text claimed as a length finish (all of which a correct client
retries), and two odd but legitimate answers a correct client must accept: fewer choices than
asked, and an empty text finished by "stop".

The suite sends a few hundred searches through the real openai client and classifies each:
a success must be *the* answer (the one a fault-free upstream gives the same seeded request,
replaying the odd answers the faulty one really served), a failure must be a clear
OpenAI-shaped 502/504 (or the same error in-band for a stream); nothing may hang, and nothing
may end any other way.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest

from proxy.testing.toy_server import FAULT_KINDS, QUIRKS, ToyCompletionsServer
from proxy.types import SamplingParams
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import upstream_config
from tests.doubles import FnScorer
from tests.test_server import MODEL, app_config, distinct_words, served, wait_for

SEARCHES = 500
CONCURRENCY = 32
FAULT_RATE = 0.2
WHOLE_RUN_S = 240.0
"""The whole suite's bound (a loaded 2-core machine); it usually takes a small part of it."""
PER_REQUEST_S = 90.0
"""One search's bound: its slowest legitimate path is a few upstream calls each retried up to
MAX_ATTEMPTS times past the upstream timeout."""
UPSTREAM_TIMEOUT_S = 1.0
MAX_ATTEMPTS = 6

MODES = {"bon3": {"w": 1, "k": 3}, "cbs": {"w": 2, "k": 2, "l": 4}}
CAPS = {"min_l": 4, "max_w_times_k": 16, "max_tokens": 64}
ERROR_CODES = {502: "upstream_error", 504: "upstream_timeout"}


def fault_config(server: ToyCompletionsServer, max_attempts: int = MAX_ATTEMPTS) -> Any:
    # n and prompt lists are declared supported, so that an odd answer changes only the request
    # it answered and not what the upstream learns for every later search: each search's answer
    # then depends on its own upstream answers alone, and can be compared with a reference run.
    return app_config(server, server={"port": 0, "modes": MODES, "caps": CAPS}, timeout_s=UPSTREAM_TIMEOUT_S,
                      max_attempts=max_attempts, backoff_initial_s=0.01, backoff_max_s=0.05, max_concurrency=64,
                      supports_n=True, supports_prompt_lists=True)


# ------------------------------------------------------------------------------ one fault at a time


async def test_the_fault_rate_is_seeded_counted_and_reported() -> None:
    """The same seed faults the same arrivals the same way; /toy/stats reports the counts."""
    async def run(seed: int) -> tuple[list[int], Counter[str], Any]:
        kinds = (500, "malformed", "no-choices", "empty-text")  # answered at once, nothing cut
        async with ToyCompletionsServer(fault_rate=0.5, fault_seed=seed, fault_kinds=kinds) as server:
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
            statuses = []
            for i in range(40):
                try:
                    r = await client.completions.with_raw_response.create(model=MODEL, prompt=f"P{i}", max_tokens=2)
                    statuses.append(r.http_response.status_code)
                except openai.APIStatusError as e:
                    statuses.append(e.status_code)
            await client.close()
            stats = await client_stats(server)
            return statuses, Counter(server.injected), stats

    first, second, other = await run(1), await run(1), await run(2)
    assert first[:2] == second[:2] and first[:2] != other[:2]
    assert 10 <= sum(first[1].values()) <= 30 and first[0].count(500) == first[1]["500"]
    assert first[2] == {"requests": 40, "completed": 40 - sum(first[1].values()) + first[1]["empty-text"],
                        "injected": dict(first[1])}
    with pytest.raises(ValueError, match="unknown fault"):
        ToyCompletionsServer(fault_rate=0.1, fault_kinds=["slow"])


async def client_stats(server: ToyCompletionsServer) -> Any:
    async with aiohttp.ClientSession() as s:
        async with s.get(server.base_url.removesuffix("/v1") + "/toy/stats") as r:
            return await r.json()


@pytest.mark.parametrize("fault", [str(f) for f in FAULT_KINDS])
async def test_each_fault_kind_is_retried_or_accepted(fault: str) -> None:
    """A failure is retried into exactly the fault-free answer; a quirk is the answer."""
    kind: int | str = int(fault) if fault.isdigit() else fault
    params = SamplingParams(n=3, max_tokens=6, seed=11)
    async with ToyCompletionsServer(failures=[kind], hang_s=30.0, retry_after_s=0.02) as faulty, \
            ToyCompletionsServer() as clean:
        async with OpenAICompletionsUpstream(upstream_config(faulty, timeout_s=0.5)) as up:
            got = await asyncio.wait_for(up.sample_prompt("The cat", params), 20)
        async with OpenAICompletionsUpstream(upstream_config(clean)) as ref_up:
            ref = await ref_up.sample_prompt("The cat", params)
        await wait_for(lambda: faulty.in_flight == 0, "the hung handler to be cancelled")
    assert faulty.injected == Counter({fault: 1})
    if kind in QUIRKS:
        assert list(faulty.quirks_served.values()) == [kind] and len(got.continuations) == 3
        if kind == "empty-text":
            assert len(faulty.requests) == 1
            assert got.continuations[0].text == "" and got.continuations[0].finished
            assert got.continuations[1:] == ref.continuations[1:]
        else:  # the missing choice was asked for alone
            assert [q["n"] for q in faulty.requests] == [3, 1]
            assert got.continuations[:2] == ref.continuations[:2]
    else:
        assert len(faulty.requests) == 2  # the fault, then its retry
        assert got.continuations == ref.continuations and got.usage == ref.usage and got.calls == 1


# ------------------------------------------------------------------------------ the fault suite


@dataclass(frozen=True)
class Spec:
    """One client request."""

    i: int
    chat: bool
    mode: str  # "", "bon3" or "cbs"
    stream: bool
    max_tokens: int
    l: int | None
    temperature: float | None
    stop: list[str] | None

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(model=MODEL + (f"+{self.mode}" if self.mode else ""), max_tokens=self.max_tokens,
                                  seed=1000 + self.i)
        if self.l is not None:
            kw["extra_body"] = {"w2s": {"l": self.l}}
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        if self.stop:
            kw["stop"] = self.stop
        if self.stream:
            kw.update(stream=True, stream_options={"include_usage": True})
        if self.chat:
            kw["messages"] = [{"role": "user", "content": f"Tell tale number {self.i} about a cat."}]
        else:
            kw["prompt"] = f"Story {self.i}: the dog sat on"
        return kw


def specs(count: int, seed: int = 20240) -> list[Spec]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        mode = rng.choice(["", "bon3", "cbs"])
        out.append(Spec(i=i, chat=rng.random() < 0.5, mode=mode, stream=rng.random() < 0.25,
                        max_tokens=rng.randint(4, 12), l=rng.randint(4, 8) if mode == "cbs" else None,
                        temperature=rng.choice([None, None, 0.0, 1.0]),
                        stop=[" dog"] if rng.random() < 0.2 else None))
    return out


@dataclass
class Outcome:
    kind: str  # "success", "error", "hung", "lost"
    answer: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


def _summary(extra: dict[str, Any] | None) -> dict[str, Any]:
    w2s = dict((extra or {}).get("w2s") or {})
    w2s.pop("wall_s", None)
    return w2s


def _usage(u: Any) -> tuple[int, int, int] | None:
    return None if u is None else (u.prompt_tokens, u.completion_tokens, u.total_tokens)


async def _whole(client: openai.AsyncOpenAI, spec: Spec) -> dict[str, Any]:
    if spec.chat:
        r = await client.chat.completions.create(**spec.kwargs())
        assert r.object == "chat.completion" and len(r.choices) == 1 and r.choices[0].message.role == "assistant"
        text = r.choices[0].message.content
    else:
        r = await client.completions.create(**spec.kwargs())
        assert r.object == "text_completion" and len(r.choices) == 1
        text = r.choices[0].text
    return {"text": text, "finish": r.choices[0].finish_reason, "usage": _usage(r.usage),
            "w2s": _summary(r.model_extra)}


async def _streamed(client: openai.AsyncOpenAI, spec: Spec) -> dict[str, Any]:
    create = client.chat.completions.create if spec.chat else client.completions.create
    stream = await create(**spec.kwargs())
    parts: list[str] = []
    finishes: list[str | None] = []
    usage: tuple[int, int, int] | None = None
    summary: dict[str, Any] = {}
    ids = set()
    async for chunk in stream:
        ids.add(chunk.id)
        if not chunk.choices:  # the usage chunk
            usage = _usage(chunk.usage)
            continue
        choice = chunk.choices[0]
        parts.append((choice.delta.content or "") if spec.chat else choice.text)
        finishes.append(choice.finish_reason)
        if choice.finish_reason is not None:
            summary = _summary(chunk.model_extra)
    assert len(ids) == 1, ids
    assert finishes and all(f is None for f in finishes[:-1]), finishes
    return {"text": "".join(parts), "finish": finishes[-1], "usage": usage, "w2s": summary}


def _openai_shaped(body: object) -> bool:
    return isinstance(body, dict) and set(body) == {"message", "type", "param", "code"} and isinstance(
        body["message"], str) and bool(body["message"])


async def ask(client: openai.AsyncOpenAI, spec: Spec) -> Outcome:
    """One request, classified."""
    try:
        answer = await asyncio.wait_for((_streamed if spec.stream else _whole)(client, spec), PER_REQUEST_S)
    except (TimeoutError, openai.APITimeoutError) as e:
        return Outcome("hung", detail=repr(e))
    except openai.APIStatusError as e:
        clear = (e.status_code in ERROR_CODES and _openai_shaped(e.body)
                 and e.body["code"] == ERROR_CODES[e.status_code] and e.body["type"] == "upstream_error")
        return Outcome("error" if clear else "lost", detail=f"HTTP {e.status_code}: {json.dumps(e.body)}")
    except openai.APIError as e:  # in-band, after a stream's 200
        clear = (spec.stream and _openai_shaped(e.body) and e.body["code"] in ERROR_CODES.values()
                 and e.body["type"] == "upstream_error")
        return Outcome("error" if clear else "lost", detail=f"{type(e).__name__}: {e.body!r}")
    except Exception as e:  # noqa: BLE001 - anything else is a lost request, reported below
        return Outcome("lost", detail=f"{type(e).__name__}: {e}")
    problem = _insane(spec, answer)
    return Outcome("lost", answer, problem) if problem else Outcome("success", answer)


def _insane(spec: Spec, a: dict[str, Any]) -> str | None:
    """What is wrong with an answer on its own, without a reference."""
    if not isinstance(a["text"], str) or a["finish"] not in ("stop", "length"):
        return f"bad text or finish_reason: {a}"
    if a["usage"] is None or a["usage"][0] + a["usage"][1] != a["usage"][2] or min(a["usage"]) < 0:
        return f"bad usage: {a['usage']}"
    w2s = a["w2s"]
    if not w2s or w2s["tokens"] > spec.max_tokens or w2s["upstream_calls"] < 1 or w2s["finished"] != (
            a["finish"] == "stop"):
        return f"bad w2s summary: {w2s}"
    return None


async def run_all(client: openai.AsyncOpenAI, todo: list[Spec]) -> tuple[list[Outcome], float]:
    """Every spec at most CONCURRENCY at a time, the whole bounded by WHOLE_RUN_S: requests still
    unanswered then are counted as hung."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(spec: Spec) -> Outcome:
        async with gate:
            return await ask(client, spec)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(s)) for s in todo]
    done, pending = await asyncio.wait(tasks, timeout=WHOLE_RUN_S)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    outcomes = [t.result() if t in done else Outcome("hung", detail="the whole run's bound") for t in tasks]
    return outcomes, time.perf_counter() - t0


@dataclass
class SuiteResult:
    outcomes: list[Outcome]
    counts: Counter[str]
    wrong: list[tuple[Spec, dict[str, Any], dict[str, Any]]]
    injected: Counter[str]
    upstream_requests: int
    report: str


async def fault_suite(count: int, fault_rate: float, max_attempts: int, fault_seed: int) -> SuiteResult:
    """`count` searches against an upstream faulting at `fault_rate`, then the same against a
    fault-free one that replays the odd answers the faulty one served: the reference."""
    todo = specs(count)
    async with ToyCompletionsServer(fault_rate=fault_rate, fault_seed=fault_seed, hang_s=60.0) as faulty:
        async with served(fault_config(faulty, max_attempts), scorer=FnScorer(distinct_words)) as (srv, client):
            outcomes, took = await run_all(client.with_options(timeout=PER_REQUEST_S), todo)
            await wait_for(lambda: srv.metrics.total("w2s_generations_in_flight") == 0, "searches to end", 30)
        await wait_for(lambda: faulty.in_flight == 0, "upstream handlers to end", 30)
    injected, served_quirks = Counter(faulty.injected), dict(faulty.quirks_served)

    async with ToyCompletionsServer(quirks=served_quirks) as clean:
        async with served(fault_config(clean), scorer=FnScorer(distinct_words)) as (_, client):
            references, ref_took = await run_all(client.with_options(timeout=PER_REQUEST_S), todo)
    assert [r.kind for r in references].count("success") == count, [r for r in references if r.kind != "success"]
    assert clean.injected == Counter({k: v for k, v in injected.items() if k in QUIRKS})  # every quirk replayed

    wrong = [(s, o.answer, r.answer) for s, o, r in zip(todo, outcomes, references, strict=True)
             if o.kind == "success" and o.answer != r.answer]
    counts = Counter(o.kind for o in outcomes)
    report = (f"{count} searches, fault rate {fault_rate}, {max_attempts} attempts: {took:.1f} s "
              f"(reference {ref_took:.1f} s), {dict(counts)}, wrong {len(wrong)}; {len(faulty.requests)} upstream "
              f"requests, faults injected {dict(injected)}")
    print(report)
    return SuiteResult(outcomes, counts, wrong, injected, len(faulty.requests), report)


def assert_nothing_hung_lost_or_wrong(r: SuiteResult) -> None:
    assert r.counts["hung"] == 0, [o.detail for o in r.outcomes if o.kind == "hung"][:5]
    assert r.counts["lost"] == 0, [o.detail for o in r.outcomes if o.kind == "lost"][:5]
    assert not r.wrong, r.wrong[:3]
    assert r.counts["success"] + r.counts["error"] == len(r.outcomes)


async def test_searches_against_a_faulty_upstream_are_right_or_clearly_refused() -> None:
    r = await fault_suite(SEARCHES, FAULT_RATE, MAX_ATTEMPTS, fault_seed=7)
    assert sum(r.injected.values()) >= 0.15 * r.upstream_requests, r.report  # the faults really happened
    assert {str(k) for k in FAULT_KINDS} <= set(r.injected), r.report  # every kind of them
    assert_nothing_hung_lost_or_wrong(r)
    assert r.counts["success"] >= 0.99 * SEARCHES, r.report


async def test_when_retries_run_out_every_failure_is_a_clear_502_or_504() -> None:
    """Most searches fail here, whole and streamed: each must say so in OpenAI's shape."""
    r = await fault_suite(120, fault_rate=0.75, max_attempts=2, fault_seed=3)
    assert_nothing_hung_lost_or_wrong(r)
    errors = [o.detail for o in r.outcomes if o.kind == "error"]
    assert len(errors) >= 40, r.report
    assert any("HTTP 502" in e for e in errors) and any("HTTP 504" in e for e in errors), errors
    assert any(e.startswith("APIError") for e in errors), errors  # in-band, in a stream
