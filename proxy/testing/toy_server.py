"""The toy model behind the local completions server, with knobs for tests and benchmarks.

Why it exists: the suite needs an upstream that speaks the real OpenAI wire format (so the real
`openai.AsyncOpenAI` client, its error classes and its retry headers are exercised) but needs no
network, no API key and no model weights, and whose outputs are reproducible.

Knobs: `failures` (a queue of faults to answer first, to test retries: an HTTP status, with
`Retry-After` when `retry_after_s` is set, or one of the fault kinds below by name),
`fault_rate` (0..1: each request is answered with a fault with this probability, the fault
drawn from `fault_kinds`, both by a `random.Random(fault_seed)`, so a run is reproducible up to
the arrival order of concurrent requests), `latency_s` (each answer leaves that long after its
request arrived; to test timeouts and cancellation, see `in_flight`, and for benchmarks),
`support_n=False` (a server that refuses n > 1, like some vLLM deployments and proxies),
`support_prompt_lists=False` (one that refuses a list of several prompts), `ignore_n=True` (one
that answers n > 1 with one choice and no error, as OpenRouter does).

The fault kinds come in two classes, and a correct client must tell them apart:

* Failures, which are not answers and must be retried (or reported): an HTTP status (429 with
  `Retry-After`, 500, 503, ...), "hang" (no answer for `hang_s`, longer than any sensible
  client timeout), "reset" (the connection dropped without a response), "short-body" (a 200
  whose body stops before its Content-Length), "malformed" (a 200 that is not JSON),
  "truncated" (a 200 whose JSON is cut short), "no-choices", "empty-length" (a choice with no
  text finished by the length limit: it claims max_tokens but holds none).
* Quirks (`QUIRKS`), odd but legitimate answers that a correct client must accept:
  "fewer-choices" (fewer choices than asked, as a server that ignores n does; with one choice
  asked this is "no-choices", a failure, and is counted as that) and "empty-text" (the first
  choice is "" finished by "stop": the model ended at once, a real answer). A quirk changes
  what the client gets, so every quirk served is recorded by the body it answered
  (`quirks_served`, keyed by `body_key`); a server given that record as `quirks` answers those
  bodies the same way on every arrival, so a fault-free reference run can replay them.

Every fault injected is counted by kind in `injected`. `GET /toy/stats` returns these counts
(and `requests` / `completed`) as JSON, for a server running in another process.

Run `python -m proxy.testing.toy_server --port 0` to serve one by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from aiohttp import web

from proxy.local.backend import Choice
from proxy.local.server import LocalCompletionsServer
from proxy.protocol.model_requests import CompletionParams
from proxy.serving.body import read_body
from proxy.serving.errors import ApiError
from proxy.testing.faults import (
    BAD_ANSWERS,
    FAULT_KINDS,
    QUIRKS,
    Fault,
    check_fault,
    bad_answer,
    body_key,
    status_response,
)
from proxy.testing.toy_model import DEFAULT_VOCAB, ToyBackend

__all__ = ["DEFAULT_VOCAB", "FAULT_KINDS", "QUIRKS", "ToyCompletionsServer", "body_key", "main"]

class ToyCompletionsServer(LocalCompletionsServer):
    """`LocalCompletionsServer` over `ToyBackend`, with fault injection.

    Bookkeeping for tests: `requests` (every JSON object body POSTed to /v1/completions, in
    arrival order, refused ones included), `completed` (requests answered 200 with a completion,
    quirks included; not the 200s that are not answers, nor cut connections), `in_flight`
    (completions requests being handled now; goes back down when the client disconnects, since
    handlers are cancelled then), `injected` (faults injected, by kind: "429", "hang", ...),
    `quirks_served` (body_key -> quirk). `failures` may be appended to at any time.

    Usage accounting: prompt_tokens = tokens of the prompt, once per request (as OpenAI);
    completion_tokens = sum over choices of the tokens of the returned text (nothing for EOS,
    nothing for a stop string or what followed it).
    """

    def __init__(self, *, model: str = "toy-instruct", eos_prob: float = 0.08, latency_s: float = 0.0,
                 support_n: bool = True, support_prompt_lists: bool = True, ignore_n: bool = False,
                 failures: Sequence[Fault] = (),
                 retry_after_s: float | None = None, encoding: str = "cl100k_base",
                 vocab: Sequence[str] | None = None, fault_rate: float = 0.0, fault_seed: int = 0,
                 fault_kinds: Sequence[Fault] = FAULT_KINDS, hang_s: float = 3600.0,
                 quirks: Mapping[str, str] | None = None) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        if fault_rate and not fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        for fault in (*failures, *fault_kinds):
            check_fault(fault)
        if any(q not in QUIRKS for q in (quirks or {}).values()):
            raise ValueError(f"quirks must map body keys to one of {QUIRKS}")
        self.toy = ToyBackend(vocab, eos_prob, encoding)
        super().__init__(self.toy, model=model, owned_by="w2s-toy")
        self.lm = self.toy.lm
        self.encoding = self.toy.encoding
        self.latency_s = latency_s
        self.support_n = support_n
        self.support_prompt_lists = support_prompt_lists
        self.ignore_n = ignore_n
        self.failures: deque[Fault] = deque(failures)
        self.retry_after_s = retry_after_s
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.hang_s = hang_s
        self.quirks: dict[str, str] = dict(quirks or {})
        self._rng = random.Random(fault_seed)
        self.requests: list[dict[str, Any]] = []
        self.affinity: list[str | None] = []
        """Each recorded request's `x-session-affinity` header (Fireworks' cache routing), or None."""
        self.completed = 0
        self.in_flight = 0
        self.injected: Counter[str] = Counter()
        self.quirks_served: dict[str, str] = {}

    async def __aenter__(self) -> "ToyCompletionsServer":
        await self.start()
        return self

    # ------------------------------------------------------------------ choosing a fault

    def _next_fault(self, body: object) -> Fault | None:
        """The fault for this arrival: the queue first, then a quirk recorded for this very body,
        then the seeded draw."""
        if self.failures:
            return self.failures.popleft()
        if isinstance(body, dict) and self.quirks:
            quirk = self.quirks.get(body_key(body))
            if quirk is not None:
                return quirk
        if self.fault_rate and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.fault_kinds)
        return None

    def _status(self, status: int) -> web.Response:
        retry_after = self.retry_after_s
        if retry_after is None and status == 429 and self.fault_rate:
            retry_after = 0.05  # a drawn 429 always says when to come back, as rate limiters do
        return status_response(status, retry_after)

    def _bad_answer(self, fault: str) -> web.Response:
        return bad_answer(fault, self.model)

    # ------------------------------------------------------------------ answering

    async def _cut(self, request: web.Request, fault: str, raw: bytes) -> web.StreamResponse:
        """Break the connection: before any response ("reset"), or halfway through the body of
        the answer it would have sent ("short-body")."""
        transport = request.transport
        if fault == "reset" or transport is None:
            if transport is not None:
                transport.abort()
            return web.Response(status=200)  # never sent: the connection is gone
        whole = await self.respond(raw)
        assert isinstance(whole.body, bytes)
        response = web.StreamResponse(status=whole.status, headers={"Content-Type": "application/json"})
        response.content_length = len(whole.body)
        await response.prepare(request)
        await response.write(whole.body[: len(whole.body) // 2])
        transport.abort()
        return response

    async def _quirk(self, raw: bytes, fault: str) -> tuple[web.Response, str | None]:
        """The odd answer `fault` to `raw`, and the kind served: "no-choices" when only one
        choice was asked for and it is held back, None for a request refused with a 400."""
        try:
            batch = self.parse(raw)
            results = await self.run(batch)
        except ApiError as e:
            return e.response(), None
        if fault == "empty-text":
            choices, prompt_tokens = results[0]
            results[0] = ([Choice("", "stop", 0), *choices[1:]], prompt_tokens)
        else:  # fewer-choices: the last choice of the last prompt is held back
            if sum(len(c) for c, _ in results) <= 1:
                return self._bad_answer("no-choices"), "no-choices"
            choices, prompt_tokens = results[-1]
            results[-1] = (choices[:-1], prompt_tokens)
        return self.answer(batch, results), fault

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            arrived = time.perf_counter()
            try:
                raw = await read_body(request)
            except ApiError as e:
                return e.response()
            try:
                body: object = json.loads(raw)
            except (ValueError, RecursionError):
                body = None
            if isinstance(body, dict):
                self.requests.append(body)
                self.affinity.append(request.headers.get("x-session-affinity"))
            fault = self._next_fault(body)  # chosen on arrival
            response: web.StreamResponse
            if fault is None:
                response = await self.respond(raw)
            elif isinstance(fault, int):
                response = self._status(fault)
            elif fault == "hang":
                self.injected[fault] += 1  # counted now: a hang usually ends with the client giving up
                await asyncio.sleep(self.hang_s)
                fault, response = None, await self.respond(raw)
            elif fault in QUIRKS:
                response, fault = await self._quirk(raw, fault)
                if fault in QUIRKS and response.status == 200 and isinstance(body, dict):
                    self.quirks_served[body_key(body)] = fault
            elif fault in BAD_ANSWERS:
                response = self._bad_answer(fault)
            elif fault in ("reset", "short-body"):
                response = web.Response(status=200)  # not sent: the connection is cut below
            else:
                raise ValueError(f"unknown fault {fault!r}")
            if fault is not None:
                self.injected[str(fault)] += 1
            # The answer goes out latency_s after arrival, its work done meanwhile: like an API
            # that serves requests in parallel, many requests in flight do not queue behind
            # each other's sampling (which is serial here).
            if self.latency_s:
                await asyncio.sleep(max(0.0, self.latency_s - (time.perf_counter() - arrived)))
            if fault in ("reset", "short-body"):
                return await self._cut(request, str(fault), raw)
            if response.status == 200 and (fault is None or fault in QUIRKS):
                self.completed += 1
            return response
        finally:
            self.in_flight -= 1

    @staticmethod
    def parse(raw: bytes) -> list[CompletionParams]:
        try:
            return LocalCompletionsServer.parse(raw)
        except RecursionError:  # nested deeper than json.loads goes: not JSON we can read
            raise ApiError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None

    async def _unknown(self, request: web.Request) -> web.Response:
        if request.method == "GET" and request.path == "/toy/stats":
            return web.json_response({"requests": len(self.requests), "completed": self.completed,
                                      "injected": dict(self.injected)})
        return await super()._unknown(request)

    async def run(self, batch: list[CompletionParams]) -> list[tuple[list[Choice], int]]:
        if batch[0].n > 1 and not self.support_n:
            raise ApiError(400, "n > 1 is not supported by this server", param="n")
        if len(batch) > 1 and not self.support_prompt_lists:
            raise ApiError(400, "prompt must be a single string on this server", param="prompt")
        if self.ignore_n:
            batch = [replace(p, n=1) for p in batch]
        return await super().run(batch)


async def _serve(args: argparse.Namespace) -> None:
    server = ToyCompletionsServer(model=args.model, eos_prob=args.eos_prob, latency_s=args.latency_s,
                                  support_n=not args.no_n, support_prompt_lists=not args.no_prompt_lists,
                                  fault_rate=args.fault_rate, fault_seed=args.fault_seed, hang_s=args.hang_s)
    await server.start(args.port)
    try:
        print(server.base_url, flush=True)
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m proxy.testing.toy_server --port 0`: print the base URL and serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m proxy.testing.toy_server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", default="toy-instruct")
    parser.add_argument("--eos-prob", type=float, default=0.08)
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--no-n", action="store_true", help="refuse n > 1 with a 400")
    parser.add_argument("--no-prompt-lists", action="store_true", help="refuse a list of several prompts with a 400")
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="answer this fraction of requests (0..1) with a fault of a random kind")
    parser.add_argument("--fault-seed", type=int, default=0, help="seeds which requests fault and how")
    parser.add_argument("--hang-s", type=float, default=3600.0, help="how long a 'hang' fault holds its answer")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
