"""The toy model behind the local completions server, with knobs for tests and benchmarks.

Why it exists: the suite needs an upstream that speaks the real OpenAI wire format (so the real
`openai.AsyncOpenAI` client, its error classes and its retry headers are exercised) but needs no
network, no API key and no model weights, and whose outputs are reproducible.

Knobs: `failures` (a queue of faults to answer first, to test retries: an HTTP status, with
`Retry-After` when `retry_after_s` is set, or one of the 200s that are not answers:
"truncated" (a body cut short), "no-choices", "empty-length" (a choice with no text finished by
the length limit)), `latency_s` (each answer leaves that long after its request
arrived; to test timeouts and cancellation, see `in_flight`, and for benchmarks),
`support_n=False` (a server that refuses n > 1, like some vLLM deployments and proxies),
`support_prompt_lists=False` (one that refuses a list of several prompts), `ignore_n=True` (one
that answers n > 1 with one choice and no error, as OpenRouter does).

Run `python -m proxy.testing.toy_server --port 0` to serve one by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from aiohttp import web

from proxy.local.backend import Choice
from proxy.local.server import LocalCompletionsServer
from proxy.protocol.engine import CompletionParams
from proxy.serving.errors import ApiError
from proxy.testing.toy_model import DEFAULT_VOCAB, ToyBackend

__all__ = ["DEFAULT_VOCAB", "ToyCompletionsServer", "main"]


class ToyCompletionsServer(LocalCompletionsServer):
    """`LocalCompletionsServer` over `ToyBackend`, with fault injection.

    Bookkeeping for tests: `requests` (every JSON object body POSTed to /v1/completions, in
    arrival order, refused ones included), `completed` (requests answered 200), `in_flight`
    (completions requests being handled now; goes back down when the client disconnects, since
    handlers are cancelled then). `failures` may be appended to at any time.

    Usage accounting: prompt_tokens = tokens of the prompt, once per request (as OpenAI);
    completion_tokens = sum over choices of the tokens of the returned text (nothing for EOS,
    nothing for a stop string or what followed it).
    """

    def __init__(self, *, model: str = "toy-instruct", eos_prob: float = 0.08, latency_s: float = 0.0,
                 support_n: bool = True, support_prompt_lists: bool = True, ignore_n: bool = False,
                 failures: Sequence[int | str] = (),
                 retry_after_s: float | None = None, encoding: str = "cl100k_base",
                 vocab: Sequence[str] | None = None) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.toy = ToyBackend(vocab, eos_prob, encoding)
        super().__init__(self.toy, model=model, owned_by="w2s-toy")
        self.lm = self.toy.lm
        self.encoding = self.toy.encoding
        self.latency_s = latency_s
        self.support_n = support_n
        self.support_prompt_lists = support_prompt_lists
        self.ignore_n = ignore_n
        self.failures: deque[int | str] = deque(failures)
        self.retry_after_s = retry_after_s
        self.requests: list[dict[str, Any]] = []
        self.completed = 0
        self.in_flight = 0

    async def __aenter__(self) -> "ToyCompletionsServer":
        await self.start()
        return self

    def _failure(self, fault: int | str) -> web.Response:
        if isinstance(fault, str):
            return self._bad_answer(fault)
        status = fault
        type_ = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        headers = None
        if self.retry_after_s is not None:
            # Fractional seconds are allowed, so tests can ask for short waits: the openai SDK
            # and proxy.upstreams.retry parse floats (and prefer retry-after-ms anyway).
            seconds = float(self.retry_after_s)
            headers = {"Retry-After": str(int(seconds)) if seconds.is_integer() else repr(seconds),
                       "retry-after-ms": str(round(seconds * 1000))}
        return ApiError(status, f"injected failure: HTTP {status}", type_=type_, headers=headers).response()

    def _bad_answer(self, fault: str) -> web.Response:
        usage = {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
        if fault == "truncated":
            return web.Response(text='{"id": "cmpl-1", "object": "text_completion", "choices": [{"te',
                                 content_type="application/json")
        if fault == "no-choices":
            return web.json_response({"object": "text_completion", "model": self.model, "choices": [], "usage": usage})
        if fault == "empty-length":
            return web.json_response({"object": "text_completion", "model": self.model, "usage": usage, "choices": [
                {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]})
        raise ValueError(f"unknown fault {fault!r}")

    async def _completions(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            arrived = time.perf_counter()
            raw = await request.read()
            try:
                body: object = json.loads(raw)
            except ValueError:
                body = None
            if isinstance(body, dict):
                self.requests.append(body)
            failure = self.failures.popleft() if self.failures else None  # popped on arrival
            response = self._failure(failure) if failure is not None else await self.respond(raw)
            # The answer goes out latency_s after arrival, its work done meanwhile: like an API
            # that serves requests in parallel, many requests in flight do not queue behind
            # each other's sampling (which is serial here).
            if self.latency_s:
                await asyncio.sleep(max(0.0, self.latency_s - (time.perf_counter() - arrived)))
            if response.status == 200:
                self.completed += 1
            return response
        finally:
            self.in_flight -= 1

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
                                  support_n=not args.no_n, support_prompt_lists=not args.no_prompt_lists)
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
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
