"""Every route of the guidance server and of the local completions server, fuzzed with hypothesis.

Requests are drawn from valid-ish bodies (the real fields, each sometimes replaced by any JSON
value), any JSON, raw bytes (invalid UTF-8 and lone surrogates included), wrong and missing
content types and encodings, random headers, methods and paths. Whatever arrives, a server
must answer within a bound, with no 5xx (the toy upstream is healthy, so not even 502/504), and
every error must be OpenAI's `{"error": {message, type, param, code}}`; a 200 must be a
well-formed answer. The servers run on one event loop owned by the module, started once for all
examples; each example is one HTTP request on that loop.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import string
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import AppConfig, OpenAIChatConfig, SearchConfig, ServerConfig
from proxy.local.server import LocalCompletionsServer
from proxy.presets import resolve_server
from proxy.serving.app import GuidanceServer
from proxy.testing.fake_openai_chat import FakeChatServer
from proxy.testing.toy_model import ToyBackend
from proxy.testing.toy_server import ToyCompletionsServer
from tests.doubles import FnScorer
from tests.test_server import MODEL, app_config, distinct_words
from tests.conftest import on_any_port

REQUEST_BOUND_S = 30.0
"""Every request must be answered within this (W2S_FUZZ_EXAMPLES=N runs a longer fuzz)."""
API_KEY = "fuzz-key"
EXPLORE = "W2S_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=int(os.environ.get("W2S_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                derandomize=not EXPLORE, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
"""`make test` draws the same examples every run, so that it passes or fails on the code alone; a
longer fuzz (W2S_FUZZ_EXAMPLES=N) draws fresh ones each time, to find what those miss."""

# ------------------------------------------------------------------------------ the servers


class ErrorLog(logging.Handler):
    """ERROR records of the servers' loggers: an unhandled exception is logged there."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Target:
    name: str
    loop: asyncio.AbstractEventLoop
    root: str  # http://127.0.0.1:port
    session: aiohttp.ClientSession
    errors: ErrorLog
    toy: ToyCompletionsServer | None  # the upstream, or the server itself
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        """One request on the module's loop; what the servers logged as errors meanwhile is in
        `answer.logged`."""
        before = len(self.errors.records)

        async def go() -> Answer:
            async with self.session.request(method, self.root + path, data=body, headers=headers,
                                            skip_auto_headers=("Content-Type",)) as r:
                return Answer(r.status, r.headers.get("Content-Type", ""), await r.read())

        answer = self.loop.run_until_complete(asyncio.wait_for(go(), REQUEST_BOUND_S))
        answer.logged = [r.getMessage() for r in self.errors.records[before:]]
        self.sent += 1
        self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
        return answer


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    logged: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _watch_errors(*names: str) -> ErrorLog:
    handler = ErrorLog()
    for name in names:
        logging.getLogger(name).addHandler(handler)
    return handler


def _unwatch(handler: ErrorLog, *names: str) -> None:
    for name in names:
        logging.getLogger(name).removeHandler(handler)


LOGGERS = ("w2s", "aiohttp.server", "aiohttp.web", "asyncio")


SERVER: dict[str, Any] = {"port": 0, "modes": {"bon4": {"w": 1, "k": 4}}, "caps": {"max_tokens": 64, "min_l": 4},
          "max_body_bytes": 65536}
"""The guidance servers' settings (the one over the toy completions upstream adds a CBS mode)."""


def _fuzzed(loop: asyncio.AbstractEventLoop, name: str, cfg: AppConfig, toy: ToyCompletionsServer | None,
            stop_upstream: Callable[[], Awaitable[object]]) -> Iterator[Target]:
    """A guidance server on `cfg`, keyed, scored by distinct words, as a Target; `stop_upstream`
    stops what it calls once the server has stopped."""
    errors = _watch_errors(*LOGGERS)
    server = GuidanceServer(cfg, scorer=FnScorer(distinct_words), api_keys=[API_KEY], shutdown_timeout_s=0.5)

    async def start() -> aiohttp.ClientSession:
        await server.start(port=0)
        await server.wait_ready()
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_BOUND_S))

    session = loop.run_until_complete(start())
    try:
        yield Target(name, loop, server.base_url.removesuffix("/v1"), session, errors, toy)
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(server.stop())
        loop.run_until_complete(stop_upstream())
        _unwatch(errors, *LOGGERS)


@pytest.fixture(scope="module")
def guidance(loop: asyncio.AbstractEventLoop) -> Iterator[Target]:
    toy = ToyCompletionsServer()
    loop.run_until_complete(toy.start())
    cfg = app_config(toy, server={**SERVER, "modes": {**SERVER["modes"], "cbs": {"w": 2, "k": 2, "l": 8}}})
    yield from _fuzzed(loop, "guidance", cfg, toy, toy.stop)


@pytest.fixture(scope="module")
def forwarding(loop: asyncio.AbstractEventLoop) -> Iterator[Target]:
    """The guidance server over a chat upstream (the fake, in vLLM's dialect), where plain mode
    forwards what only the upstream can honour (proxy.serving.passthrough)."""
    fake = FakeChatServer("vllm", model=MODEL)
    loop.run_until_complete(fake.__aenter__())
    upstream = OpenAIChatConfig(model=MODEL, base_url=fake.base_url, timeout_s=10.0, backoff_initial_s=0.01,
                                backoff_max_s=0.02)
    cfg = AppConfig(upstream=upstream, search=SearchConfig(),
                    server=ServerConfig.model_validate(resolve_server(SERVER)))
    yield from _fuzzed(loop, "forwarding", cfg, None, lambda: fake.__aexit__(None, None, None))


@pytest.fixture(scope="module", params=["serve-local", "toy"])
def local(loop: asyncio.AbstractEventLoop, request: pytest.FixtureRequest) -> Iterator[Target]:
    """`LocalCompletionsServer` over the toy backend (what `w2s serve-local` runs), and the toy
    server (its subclass, with its own request reading), fault-free."""
    errors = _watch_errors(*LOGGERS)
    toy = ToyCompletionsServer() if request.param == "toy" else None
    server = toy or LocalCompletionsServer(ToyBackend(), model=MODEL, owned_by="w2s-local")

    async def start() -> aiohttp.ClientSession:
        await server.start()
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_BOUND_S))

    session = loop.run_until_complete(start())
    try:
        yield Target(request.param, loop, server.base_url.removesuffix("/v1"), session, errors, toy)
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(server.stop())
        _unwatch(errors, *LOGGERS)


# ------------------------------------------------------------------------------ what is sent

# Any character, lone surrogates included (JSON can carry them as \\udXXX escapes).
any_text = st.text(st.characters(exclude_categories=()), max_size=24)
words = st.text(string.ascii_letters + " .,!?'\n", max_size=40)
json_scalar = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | any_text
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(any_text, inner, max_size=3), max_leaves=8)


def sometimes_garbage(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `valid`, sometimes any JSON value in its place."""
    return st.one_of(valid, valid, valid, json_value)


small_int = st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 8, 16, 64, 65, 1000, 2**31, 2**63, 10**30])
unit_float = st.sampled_from([-0.5, 0.0, 1e-9, 0.3, 0.7, 1.0, 1.5, 2.0, 2.0001, 1e308]) | st.floats(-1, 3)
models = st.sampled_from([MODEL, f"{MODEL}+bon4", f"{MODEL}+cbs", f"{MODEL}+", f"{MODEL}+nope", "gpt-4", "",
                          f"+{MODEL}", f"{MODEL}+bon4+cbs"]) | any_text
w2s = st.fixed_dictionaries({}, optional={
    "mode": sometimes_garbage(st.sampled_from(["bon4", "cbs", "base", "nope", ""])),
    "w": sometimes_garbage(small_int), "k": sometimes_garbage(small_int),
    "l": sometimes_garbage(st.none() | small_int), "prefer_finished": sometimes_garbage(st.booleans()),
    "beams": json_value})
sampling = {
    "max_tokens": sometimes_garbage(small_int), "temperature": sometimes_garbage(unit_float),
    "top_p": sometimes_garbage(unit_float), "n": sometimes_garbage(st.sampled_from([1, 2])),
    "stop": sometimes_garbage(words | st.lists(words, max_size=5)),
    "seed": sometimes_garbage(st.integers(-2**70, 2**70)),
    "stream": sometimes_garbage(st.booleans()),
    "stream_options": sometimes_garbage(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "user": sometimes_garbage(words), "frequency_penalty": sometimes_garbage(unit_float),
    "presence_penalty": sometimes_garbage(unit_float), "logit_bias": json_value,
    "w2s": sometimes_garbage(w2s), "tools": json_value, "unknown_field": json_value,
}
completion_body = st.fixed_dictionaries(
    {"model": sometimes_garbage(models), "prompt": sometimes_garbage(any_text | words | st.lists(words, max_size=3))},
    optional={**sampling, "echo": sometimes_garbage(st.booleans()), "logprobs": json_value,
              "suffix": sometimes_garbage(words), "best_of": sometimes_garbage(small_int)})
message = st.fixed_dictionaries(
    {"role": sometimes_garbage(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])),
     "content": sometimes_garbage(any_text | words | st.lists(st.fixed_dictionaries(
         {"type": sometimes_garbage(st.just("text")), "text": sometimes_garbage(words)}), max_size=3))},
    optional={"name": sometimes_garbage(words)})
chat_body = st.fixed_dictionaries(
    {"model": sometimes_garbage(models), "messages": sometimes_garbage(st.lists(message, max_size=4))},
    optional={**sampling, "max_completion_tokens": sometimes_garbage(small_int), "logprobs": json_value,
              "top_logprobs": json_value})


served_models = st.sampled_from([MODEL, f"{MODEL}+bon4", f"{MODEL}+cbs"])
valid_sampling = {
    "max_tokens": st.integers(1, 24), "temperature": st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    "top_p": st.sampled_from([0.1, 0.9, 1.0]), "stop": words | st.lists(words, max_size=4),
    "seed": st.integers(-2**70, 2**70), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": words, "w2s": st.fixed_dictionaries({}, optional={
        "w": st.integers(1, 3), "k": st.integers(1, 4), "l": st.none() | st.integers(4, 12),
        "prefer_finished": st.booleans(), "mode": st.sampled_from(["bon4", "cbs"])})}
valid_completion = st.fixed_dictionaries({"model": served_models, "prompt": any_text | words},
                                         optional=valid_sampling)
valid_chat = st.fixed_dictionaries(
    {"model": served_models, "messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": any_text | words | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}),
                                               max_size=2)}), min_size=1, max_size=3)},
    optional={**valid_sampling, "max_completion_tokens": st.integers(1, 24)})

valid_response = st.fixed_dictionaries(
    {"model": served_models, "input": any_text | words | st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": any_text | words | st.lists(st.fixed_dictionaries({
            "type": st.sampled_from(["input_text", "output_text", "input_image"]), "text": words}), max_size=2)}),
        min_size=1, max_size=3)},
    optional={**{k: v for k, v in valid_sampling.items() if k not in ("max_tokens", "stop", "stream_options")},
              "max_output_tokens": st.integers(0, 24), "instructions": any_text | words,
              "store": st.booleans(), "previous_response_id": words, "tools": st.lists(json_value, max_size=1)})
"""A Responses API body (POST /v1/responses): `input` as text or messages, and its own names."""


@st.composite
def encoded(draw: st.DrawFn, body: st.SearchStrategy[Any]) -> bytes:
    """A JSON value as bytes, in any of the ways a client might (mis)encode it."""
    value = draw(body)
    how = draw(st.sampled_from(["ascii", "utf8", "nan-ok", "truncated"]))
    text = json.dumps(value, ensure_ascii=how == "ascii", allow_nan=True)
    raw = text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8
    if how == "truncated":
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


DEEP = b"[" * 5000
raw_bytes = st.binary(max_size=256) | st.sampled_from([
    b"", b"null", b"[]", b"{}", b"\xef\xbb\xbf{}", b'{"model": "toy-instruct", "prompt": "\\ud800"}',
    b'{"model": "toy-instruct", "prompt": "x", "model": 3}', b"{" * 2000, DEEP + b"]" * 5000,
    b'{"model": "toy-instruct", "prompt": "x", "max_tokens": 1e400}', b'{"a": NaN}'])
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                 "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/octet-stream", ""]
ACCEPTS = ["*/*", "application/json", "text/event-stream", "application/openmetrics-text; version=1.0.0",
           "application/openmetrics-text", "text/plain;version=0.0.4", "garbage/;;;", ""]
TOKEN = string.ascii_letters + string.digits + "-_"
RESERVED = {"content-length", "transfer-encoding", "host", "connection", "content-encoding", "expect", "upgrade",
            "te", "trailer", "keep-alive", "content-type", "accept", "authorization"}
extra_headers = st.dictionaries(st.text(TOKEN, min_size=1, max_size=12).filter(lambda h: h.lower() not in RESERVED
                                                                                and not h.lower().startswith("proxy")),
                                st.text(string.printable.strip() + " ", max_size=30), max_size=3)
paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", f"/v1/models/{MODEL}",
                         f"/v1/models/{MODEL}+bon4", "/v1/models/nope", "/health", "/health/ready", "/metrics",
                         "/", "/v1", "/v1/", "/v1/embeddings", "/v1/models/", "/v1/models/a/b%2Fc", "/%ff",
                         "/v1/completions/", "/v1//completions"]) | st.text(TOKEN + "/%.~", max_size=30).map(
    lambda p: "/" + p)
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
ENCODINGS = ("gzip", "deflate", "gzip-garbage", "deflate-garbage", "identity", "x-unknown", "gzip, identity")
"""Content-Encodings sent: "-garbage" says it but sends the body as it is. Not br or zstd: see
test_a_body_aiohttp_cannot_decode_is_refused_in_openai_shape."""


@dataclass
class Request:
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    encoding: str | None = None
    """As drawn: "gzip-garbage" is a body sent as it is under `Content-Encoding: gzip`."""
    plain: bytes | None = None
    """The body before any Content-Encoding."""


@st.composite
def requests(draw: st.DrawFn, *, generation_paths: tuple[str, ...], chat: bool = True, auth: bool = True,
             valid: st.SearchStrategy[Any] | None = None) -> Request:
    """`valid`: the well-formed bodies of the generation paths, where they are neither
    completions (the first path) nor chat (the second)."""
    kind = draw(st.sampled_from(["valid", "valid", "completion", "chat", "json", "raw", "get", "anything"] if chat
                                else ["valid", "completion", "json", "raw", "get", "anything"]))
    if kind == "valid":
        is_chat = chat and draw(st.booleans())
        method, path = "POST", generation_paths[1] if is_chat else generation_paths[0]
        body: bytes | None = draw(encoded(valid if valid is not None else valid_chat if is_chat else valid_completion))
    elif kind in ("completion", "chat"):
        method, path = "POST", generation_paths[0] if kind == "completion" else generation_paths[1]
        body = draw(encoded(completion_body if kind == "completion" else chat_body))
    elif kind == "json":
        method, path, body = "POST", draw(st.sampled_from(generation_paths)), draw(encoded(json_value))
    elif kind == "raw":
        method, path, body = "POST", draw(st.sampled_from(generation_paths)), draw(raw_bytes)
    elif kind == "get":
        method, path, body = "GET", draw(paths), None
    else:
        method, path = draw(st.sampled_from(METHODS)), draw(paths)
        body = None if method == "HEAD" else draw(st.none() | raw_bytes | encoded(json_value))
    headers = dict(draw(extra_headers))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type:
        headers["Content-Type"] = content_type
    if draw(st.booleans()):
        headers["Accept"] = draw(st.sampled_from(ACCEPTS))
    if auth:
        headers["Authorization"] = draw(st.sampled_from([f"Bearer {API_KEY}"] * 6 + [
            "", "Bearer", "Bearer ", f"bearer {API_KEY}", f"Basic {API_KEY}", "Bearer wrong", f"Bearer {API_KEY}x"]))
    encoding = draw(st.sampled_from([None] * 6 + list(ENCODINGS)))
    plain = body
    if encoding is not None and body is not None:
        if encoding == "gzip":
            body = gzip.compress(body)
        elif encoding == "deflate":
            body = zlib.compress(body)
        headers["Content-Encoding"] = encoding.removesuffix("-garbage")
    return Request(method, path, body, headers, encoding, plain)


# ------------------------------------------------------------------------------ what must come back


def openai_error(answer: Answer) -> str | None:
    """What is wrong with an error answer, or None if it is OpenAI's error shape."""
    if not answer.content_type.startswith("application/json"):
        return f"content type {answer.content_type!r}"
    try:
        body = json.loads(answer.body)
    except ValueError:
        return "not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(error, dict)
            and set(error) == {"message", "type", "param", "code"}):
        return f"not {{error: {{message, type, param, code}}}}: {body!r}"[:300]
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        return f"empty message or type: {error!r}"
    return None


ENDED = ("response.completed", "response.incomplete")
"""How a Responses stream from a healthy upstream ends (the API's last event)."""


def responses_stream_problem(answer: Answer) -> str | None:
    events = [json.loads(line.removeprefix(b"data: ")) for line in answer.body.split(b"\n")
              if line.startswith(b"data: ")]
    if not events or events[-1].get("type") not in ENDED:
        return f"stream does not end with {' or '.join(ENDED)}: {answer.body[-200:]!r}"
    failed = [e for e in events if e.get("type") in ("error", "response.failed")]
    return f"error in a stream from a healthy upstream: {failed[0]}" if failed else None


def stream_problem(answer: Answer) -> str | None:
    events = [e.removeprefix(b"data: ") for e in answer.body.split(b"\n\n") if e.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return f"stream does not end with [DONE]: {answer.body[-200:]!r}"
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            return f"error in a stream from a healthy upstream: {chunk}"
    return None


def check(request: Request, answer: Answer) -> None:
    where = f"{request.method} {request.path} -> {answer.status}"
    assert answer.status < 500, f"{where}: {answer.body[:500]!r}"
    if request.method == "HEAD":
        return
    if answer.status >= 400:
        problem = openai_error(answer)
        assert problem is None, f"{where}: {problem}"
    elif answer.content_type.startswith("text/event-stream"):
        problem = (responses_stream_problem if request.path == "/v1/responses" else stream_problem)(answer)
        assert problem is None, f"{where}: {problem}"
    elif request.path != "/metrics":
        body = json.loads(answer.body)
        assert isinstance(body, dict), where
        if request.method == "POST" and request.path == "/v1/responses":
            assert body["object"] == "response" and body["status"] in ("completed", "incomplete"), f"{where}: {body}"
            assert body["usage"]["total_tokens"] >= 0, f"{where}: {body}"
        elif request.method == "POST":
            assert len(body["choices"]) >= 1 and body["usage"]["total_tokens"] >= 0, f"{where}: {body}"


def unexpected_logs(request: Request, answer: Answer) -> list[str]:
    """ERROR lines logged while answering: none, whatever the request."""
    return list(answer.logged)


# ------------------------------------------------------------------------------ the tests


@FUZZ
@given(request=requests(generation_paths=("/v1/completions", "/v1/chat/completions")))
def test_guidance_server_answers_anything_without_a_5xx(guidance: Target, request: Request) -> None:
    answer = guidance.send(request.method, request.path, request.body, request.headers)
    check(request, answer)
    assert not unexpected_logs(request, answer), answer.logged[:3]


@FUZZ
@given(request=requests(generation_paths=("/v1/chat/completions", "/v1/chat/completions")))
def test_guidance_server_over_a_chat_upstream_answers_anything_without_a_5xx(forwarding: Target,
                                                                              request: Request) -> None:
    answer = forwarding.send(request.method, request.path, request.body, request.headers)
    check(request, answer)
    assert not unexpected_logs(request, answer), answer.logged[:3]


@FUZZ
@given(request=requests(generation_paths=("/v1/responses", "/v1/responses"), valid=valid_response))
def test_the_responses_endpoint_answers_anything_without_a_5xx(guidance: Target, request: Request) -> None:
    answer = guidance.send(request.method, request.path, request.body, request.headers)
    check(request, answer)
    assert not unexpected_logs(request, answer), answer.logged[:3]


def test_guidance_server_is_healthy_after_the_fuzz(guidance: Target) -> None:
    """Runs after the fuzz (same module, same server): still alive, nothing left running."""
    health = guidance.send("GET", "/health/ready", None, {})
    ok = guidance.send("POST", "/v1/completions", json.dumps(
        {"model": f"{MODEL}+bon4", "prompt": "The cat", "max_tokens": 5, "seed": 1}).encode(),
        {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert health.status == 200 and ok.status == 200 and not health.logged and not ok.logged
    assert guidance.toy is not None and guidance.toy.in_flight == 0
    assert guidance.statuses.get(200, 0) >= 10, guidance.statuses  # the fuzz reached real searches


@FUZZ
@given(request=requests(generation_paths=("/v1/completions", "/v1/completions"), chat=False, auth=False))
def test_local_completions_server_answers_anything_with_openai_shaped_4xx(local: Target, request: Request) -> None:
    answer = local.send(request.method, request.path, request.body, request.headers)
    check(request, answer)
    assert not unexpected_logs(request, answer), answer.logged[:3]


# -------------------------------------------- what the fuzz found (each fixed; kept as regressions)


async def _post(url: str, body: bytes, headers: dict[str, str]) -> Answer:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=headers) as r:
            return Answer(r.status, r.headers.get("Content-Type", ""), await r.read())


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_serve_local_refuses_an_undecodable_body_with_a_400(encoding: str) -> None:
    async with LocalCompletionsServer(ToyBackend(), model=MODEL) as server:
        answer = await _post(server.base_url + "/completions", b"not compressed at all",
                             {"Content-Encoding": encoding, "Content-Type": "application/json"})
    assert answer.status == 400 and openai_error(answer) is None
    assert json.loads(answer.body)["error"]["code"] == "invalid_encoding"


async def test_serve_local_refuses_a_deeply_nested_body_with_a_400() -> None:
    async with LocalCompletionsServer(ToyBackend(), model=MODEL) as server:
        answer = await _post(server.base_url + "/completions", DEEP + b"]" * len(DEEP),
                             {"Content-Type": "application/json"})
    assert answer.status == 400 and openai_error(answer) is None


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_guidance_server_refuses_a_deeply_nested_body_with_a_400(guidance: Target, path: str) -> None:
    """The look for fields to forward (plain-mode passthrough) parsed it with json, whose
    recursion limit is below the strict parser's: a RecursionError and a 500 until fixed."""
    answer = guidance.send("POST", path, DEEP + b"]" * len(DEEP),
                           {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert answer.status == 400 and openai_error(answer) is None and not answer.logged


@pytest.mark.parametrize("w2s", [{"mode": []}, {"mode": 3}, {"k": "four"}, ["mode"], "bon4"])
def test_guidance_server_refuses_a_bad_w2s_beside_fields_to_forward_with_a_400(guidance: Target, w2s: object) -> None:
    """A body with a field only the upstream honours (so the passthrough looks at it first) and a
    `w2s` of the wrong shape: the look resolved the raw `w2s`, a TypeError and a 500 until fixed."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "top_logprobs": [],
            "w2s": w2s}
    answer = guidance.send("POST", "/v1/chat/completions", json.dumps(body).encode(),
                           {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert answer.status == 400 and openai_error(answer) is None and not answer.logged
    assert json.loads(answer.body)["error"]["param"].startswith("w2s"), answer.body


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_body_to_forward_with_nan_or_infinity_is_refused_with_a_400(forwarding: Target, constant: str,
                                                                     stream: bool) -> None:
    """Python's json reads NaN and Infinity; forwarding them failed in the upstream client's
    JSON encoder, a 500 until fixed. Nothing reaches the upstream."""
    raw = (f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 5, '
           f'"stream": {json.dumps(stream)}, "logprobs": true, "top_logprobs": {constant}}}').encode()
    answer = forwarding.send("POST", "/v1/chat/completions", raw,
                             {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert answer.status == 400 and openai_error(answer) is None and not answer.logged
    error = json.loads(answer.body)["error"]
    assert error["code"] == "invalid_json" and constant.lstrip("-") in error["message"], error


async def test_serve_local_refuses_a_too_large_body_in_openai_shape() -> None:
    async with LocalCompletionsServer(ToyBackend(), model=MODEL) as server:
        answer = await _post(server.base_url + "/completions",
                             json.dumps({"model": MODEL, "prompt": "a" * (2 << 20)}).encode(),
                             {"Content-Type": "application/json"})
    assert answer.status == 413 and openai_error(answer) is None


@pytest.mark.parametrize(("encoding", "body", "status"), [("br", b"{}", 415), ("zstd", b"{}", 415),
                                                         ("deflate", b"\x00", 400)])
async def test_a_body_aiohttp_cannot_decode_is_refused_in_openai_shape(encoding: str, body: bytes, status: int) -> None:
    async with ToyCompletionsServer() as toy:
        cfg = app_config(toy, server={"port": 0})
        async with GuidanceServer(on_any_port(cfg), shutdown_timeout_s=0.5) as server:
            answer = await _post(server.base_url + "/completions", body,
                                 {"Content-Encoding": encoding, "Content-Type": "application/json"})
    assert answer.status == status and openai_error(answer) is None
