"""A seeded toy OpenAI-compatible completions server on 127.0.0.1.

Why it exists: the test suite and the offline demo need an upstream that speaks the real
OpenAI wire format (so the real `openai.AsyncOpenAI` client, its error classes and its retry
headers are exercised) but needs no network, no API key and no model weights, and whose
outputs are reproducible.

The "model" is a tiny Markov chain over a fixed vocabulary of words. Every vocabulary entry is
a space followed by a word, and is exactly one token in the tiktoken encoding, also when
entries are concatenated. So generated text re-tokenizes to exactly the number of words that
were sampled, and a "length" finish has exactly `max_tokens` tokens, as with a real model.

The next-word distribution depends only on the last two whitespace-separated words of
`prompt + text so far`, so continuing a prompt and continuing that prompt extended by a
generated chunk give the same distribution: the chain behaves like a language model under
chunked (beam) search.

Knobs for tests: `failures` (a queue of HTTP statuses to answer first, to test retries, with
`Retry-After` when `retry_after_s` is set), `latency_s` (each answer leaves that long after
its request arrived; to test timeouts and cancellation, see `in_flight`, and for benchmarks),
`support_n=False` (a server that refuses n > 1, like some vLLM deployments and proxies),
`support_prompt_lists=False` (one that refuses a list of several prompts).
A list of prompts is answered as OpenAI does: n choices per prompt, prompt-major by `index`,
each prompt sampled exactly as it would be alone with the same seed.

Run `python -m proxy.loopback --port 0` to serve one by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import hashlib
import json
import math
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import tiktoken
from aiohttp import web

from proxy.cost import get_encoding as load_encoding

__all__ = ["DEFAULT_VOCAB", "Choice", "CompletionBackend", "LoopbackCompletionsServer", "ToyModel", "CompletionParams", "load_encoding", "main"]

#: Common English words, most frequent first (the order sets a Zipf-like prior). Each, with its
#: leading space, is one cl100k_base token; `check_vocab` verifies this at construction time.
DEFAULT_VOCAB: tuple[str, ...] = tuple(" " + w for w in (
    "the a and to of in on it was is with by cat dog sat ran mat big red small old new happy "
    "little house tree sun sky bird fish jumped ate slept near from under over green blue one two"
).split())

MAX_N = 128  # like OpenAI: bounds the work one request can ask for
MAX_TOKENS_LIMIT = 65536
MAX_STOP = 4
MAX_PROMPTS = 64
_SHUTDOWN_TIMEOUT_S = 0.5  # stop() waits this long for in-flight handlers, then cancels them
_LOGIT_SCALE = 2.0  # std-dev of the context-dependent part of the logits


@functools.lru_cache(maxsize=16)
def check_vocab(encoding: str, vocab: tuple[str, ...]) -> None:
    """Raise ValueError unless every entry is " word", one token alone and next to any other.

    The pairwise check is what makes "n words sampled == n tokens in the text" hold: BPE merges
    never cross pre-tokenizer boundaries, and those boundaries only depend on neighbours.
    """
    if len(vocab) < 2:
        raise ValueError("vocab needs at least two entries (a word never follows itself)")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab has duplicate entries")
    enc = load_encoding(encoding)
    for w in vocab:
        if len(w) < 2 or w[0] != " " or any(c.isspace() for c in w[1:]):
            raise ValueError(f"vocab entry {w!r} must be a space followed by a word without whitespace")
        if len(enc.encode_ordinary(w)) != 1:
            raise ValueError(f"vocab entry {w!r} is not a single {encoding} token")
    for a in vocab:
        for b in vocab:
            if len(enc.encode_ordinary(a + b)) != 2:
                raise ValueError(f"vocab entries {a!r}{b!r} do not tokenize as two tokens")


def stable_int(*parts: object) -> int:
    """A 64-bit integer from `parts` that is the same in every process (unlike `hash`)."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _stable_unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from `parts`."""
    return stable_int(*parts) / 2.0**64


@dataclass(frozen=True)
class CompletionParams:
    """The validated fields of a POST /v1/completions body that affect the output."""

    model: str
    prompt: str
    n: int = 1
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


class RequestError(Exception):
    """An error answered to the client in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type_

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}
        return web.json_response(body, status=self.status, headers=headers)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_params(body: object) -> list[CompletionParams]:
    """Validate an OpenAI completions body; raise RequestError (400) naming the bad field.
    One CompletionParams per prompt (`prompt` may be a string or a list of strings).

    Fields that do not change this server's output (logprobs, echo, user, suffix, best_of,
    penalties, logit_bias, stream=false ...) are accepted and ignored; stream=true is refused
    because this server only answers whole responses.
    """
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("you must provide a model parameter", "model")
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not 1 <= len(prompts) <= MAX_PROMPTS or not all(isinstance(p, str) for p in prompts):
        raise RequestError(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings", "prompt")
    if body.get("stream"):
        raise RequestError("stream=true is not supported by this server", "stream")

    def get(name: str, default: Any) -> Any:
        value = body.get(name)
        return default if value is None else value

    n, max_tokens = get("n", 1), get("max_tokens", 16)
    temperature, top_p, seed = get("temperature", 1.0), get("top_p", 1.0), body.get("seed")
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise RequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}", "n")
    if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise RequestError(f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], got {max_tokens!r}",
                           "max_tokens")
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise RequestError(f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"seed must be an integer or null, got {seed!r}", "seed")
    stop = get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
    return [CompletionParams(model=model, prompt=p, n=n, max_tokens=max_tokens,
                             stop=tuple(s for s in stop if s),  # empty stop strings are ignored
                             temperature=float(temperature), top_p=float(top_p), seed=seed)
            for p in prompts]


@dataclass(frozen=True)
class Choice:
    """One generated continuation; `tokens` is its token count in the server's encoding."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: int


class CompletionBackend(Protocol):
    """A real model behind the same wire protocol (see `w2s serve-local`): it must run its
    compute off the event loop and return the choices and the prompt's token count."""

    async def complete(self, params: CompletionParams) -> tuple[list[Choice], int]: ...


class ToyModel:
    """A second-order Markov chain over `vocab`, plus an end-of-sequence event.

    logits(context) = prior (Zipf over vocab order) + N(0, 2) noise seeded by the last two
    words, so every context has its own stable, peaked distribution; the last word itself is
    excluded (no immediate repeats). EOS is a separate coin with probability `eos_prob` at
    every position (never part of the text).
    """

    def __init__(self, vocab: Sequence[str], eos_prob: float) -> None:
        self.vocab = tuple(vocab)
        self.eos_prob = eos_prob
        self._words = tuple(w.strip() for w in self.vocab)
        self._index = {w: i for i, w in enumerate(self._words)}
        self._prior = [-0.5 * math.log(i + 1) for i in range(len(self.vocab))]
        self._logits: dict[tuple[str, str], list[float]] = {}

    def logits(self, context: tuple[str, str]) -> list[float]:
        """Next-word logits after the words `context` (the last two words of the text)."""
        cached = self._logits.get(context)
        if cached is None:
            if len(self._logits) > 100_000:  # prompts bring arbitrary words: bound the cache
                self._logits.clear()
            rng = random.Random(stable_int("logits", *context))
            cached = [p + rng.gauss(0.0, _LOGIT_SCALE) for p in self._prior]
            last = self._index.get(context[1])
            if last is not None:  # no immediate repeats: greedy text would stick at "is is is"
                cached[last] = -math.inf
            self._logits[context] = cached
        return cached

    def _distribution(self, context: tuple[str, str], temperature: float,
                      top_p: float) -> tuple[list[int], list[float]]:
        """(word indexes, cumulative probabilities) after temperature and nucleus filtering."""
        logits = self.logits(context)
        top = max(logits)
        probs = [math.exp((x - top) / temperature) for x in logits]
        total = sum(probs)
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        kept: list[int] = []
        cum: list[float] = []
        acc = 0.0
        for i in order:
            kept.append(i)
            acc += probs[i] / total
            cum.append(acc)
            if acc >= top_p:
                break
        return kept, cum

    def generate(self, params: CompletionParams, index: int, stop_encoder: tiktoken.Encoding,
                 cache: dict[tuple[str, str], tuple[list[int], list[float]]] | None = None) -> Choice:
        """Sample choice number `index` for `params`.

        Randomness: with a seed, a `random.Random` seeded from (prompt, seed, index) through
        SHA-256, so a request is reproducible across processes and choices differ; without
        one, fresh entropy. Temperature 0 uses neither: argmax, and EOS where a hash of
        (context, position) falls below eos_prob, so it is deterministic without a seed.
        Each step draws exactly two numbers (EOS coin, word), so the same seed with a larger
        max_tokens extends the same text. `cache` shares distributions between the choices
        of one request (they have the same temperature and top_p).
        """
        greedy = params.temperature == 0
        if params.seed is not None:
            rng = random.Random(stable_int("sample", params.prompt, params.seed, index))
        else:
            rng = random.Random(secrets.randbits(64))
        cache = {} if cache is None else cache
        prompt_words = params.prompt.split()
        padded = ["", ""] + prompt_words[-2:]
        context: tuple[str, str] = (padded[-2], padded[-1])
        position = len(prompt_words)
        stops = params.stop
        tail_len = max((len(s) for s in stops), default=0) + max(len(w) for w in self.vocab)
        pieces: list[str] = []
        tail = ""
        for _ in range(params.max_tokens):
            if greedy:
                eos = _stable_unit("eos", *context, position) < self.eos_prob
            else:
                eos = rng.random() < self.eos_prob
            if eos:
                return Choice("".join(pieces), "stop", len(pieces))
            if greedy:
                logits = self.logits(context)
                i = logits.index(max(logits))
            else:
                dist = cache.get(context)
                if dist is None:
                    dist = cache[context] = self._distribution(context, params.temperature, params.top_p)
                kept, cum = dist
                i = kept[min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(kept) - 1)]
            pieces.append(self.vocab[i])
            context = (context[1], self._words[i])
            position += 1
            if stops:
                tail = (tail + self.vocab[i])[-tail_len:]
                if any(s in tail for s in stops):
                    # Every earlier step found no stop, so all matches end in this word:
                    # cut at the earliest-starting one, as the API does.
                    text = "".join(pieces)
                    cut = min(j for j in (text.find(s) for s in stops) if j >= 0)
                    text = text[:cut]
                    return Choice(text, "stop", len(stop_encoder.encode_ordinary(text)))
        return Choice("".join(pieces), "length", len(pieces))


class LoopbackCompletionsServer:
    """An aiohttp server for GET /v1/models and POST /v1/completions backed by `ToyModel`.

    Use as `async with LoopbackCompletionsServer(...) as server:` and point a client at
    `server.base_url`. Bookkeeping for tests: `requests` (every JSON object body POSTed to
    /v1/completions, in arrival order, refused ones included), `completed` (requests answered
    200), `in_flight` (completions requests being handled now; goes back down when the client
    disconnects, since handlers are cancelled then). `failures` may be appended to at any time.

    Usage accounting: prompt_tokens = tokens of the prompt, once per request (as OpenAI);
    completion_tokens = sum over choices of the tokens of the returned text (nothing for EOS,
    nothing for a stop string or what followed it).
    """

    def __init__(self, *, model: str = "toy-instruct", eos_prob: float = 0.08, latency_s: float = 0.0,
                 support_n: bool = True, support_prompt_lists: bool = True, failures: Sequence[int] = (),
                 retry_after_s: float | None = None,
                 encoding: str = "cl100k_base", vocab: Sequence[str] | None = None,
                 backend: CompletionBackend | None = None) -> None:
        if not 0.0 <= eos_prob <= 1.0:
            raise ValueError(f"eos_prob must be in [0, 1], got {eos_prob}")
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.model = model
        self.latency_s = latency_s
        self.support_n = support_n
        self.support_prompt_lists = support_prompt_lists
        self.failures: deque[int] = deque(failures)
        self.retry_after_s = retry_after_s
        self.encoding = load_encoding(encoding)
        vocab_t = tuple(DEFAULT_VOCAB if vocab is None else vocab)
        check_vocab(encoding, vocab_t)
        self.lm = ToyModel(vocab_t, eos_prob)
        self.backend = backend
        self.base_url = ""
        self.requests: list[dict[str, Any]] = []
        self.completed = 0
        self.in_flight = 0
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> str:
        """Listen on 127.0.0.1:`port` (0: an ephemeral port) and return the base URL (".../v1")."""
        if self._runner is not None:
            raise RuntimeError("server already started")
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        # handler_cancellation: a client that gives up (timeout, cancelled task) cancels our
        # handler, like a real server would stop generating; aiohttp disables this by default.
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
                               access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening; handlers still running after a short grace period are cancelled."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> LoopbackCompletionsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "w2s-loopback"}]})

    def _failure(self, status: int) -> web.Response:
        type_ = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        headers = None
        if self.retry_after_s is not None:
            # Fractional seconds are allowed, so tests can ask for short waits: the openai SDK
            # and proxy.upstreams.retry parse floats (and prefer retry-after-ms anyway).
            seconds = float(self.retry_after_s)
            headers = {"Retry-After": str(int(seconds)) if seconds.is_integer() else repr(seconds),
                       "retry-after-ms": str(round(seconds * 1000))}
        return RequestError(f"injected failure: HTTP {status}", None, status, type_).response(headers)

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
            response = await self._respond(body, failure)
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

    async def _respond(self, body: object, failure: int | None) -> web.Response:
        if failure is not None:
            return self._failure(failure)
        if body is None:
            return RequestError("We could not parse the JSON body of your request.").response()
        try:
            batch = parse_params(body)
            if batch[0].n > 1 and not self.support_n:
                raise RequestError("n > 1 is not supported by this server", "n")
            if len(batch) > 1 and not self.support_prompt_lists:
                raise RequestError("prompt must be a single string on this server", "prompt")
            return web.json_response(_merged([await self._answer(params) for params in batch]))
        except RequestError as e:  # from the checks above, or a backend refusing one prompt
            return e.response()

    async def _answer(self, params: CompletionParams) -> dict[str, Any]:
        if self.backend is not None:
            choices, prompt_tokens = await self.backend.complete(params)
        else:
            cache: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
            choices = [self.lm.generate(params, i, self.encoding, cache) for i in range(params.n)]
            prompt_tokens = len(self.encoding.encode_ordinary(params.prompt))
        completion_tokens = sum(c.tokens for c in choices)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                        for i, c in enumerate(choices)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


def _merged(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One response for a list of prompts: choices prompt-major, usage summed."""
    if len(answers) == 1:
        return answers[0]
    choices = [dict(c, index=i) for i, c in enumerate(c for a in answers for c in a["choices"])]
    usage = {k: sum(a["usage"][k] for a in answers) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {**answers[0], "choices": choices, "usage": usage}


async def _serve(args: argparse.Namespace) -> None:
    server = LoopbackCompletionsServer(model=args.model, eos_prob=args.eos_prob, latency_s=args.latency_s,
                                       support_n=not args.no_n, support_prompt_lists=not args.no_prompt_lists)
    await server.start(args.port)
    try:
        print(server.base_url, flush=True)
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m proxy.loopback --port 0`: print the base URL and serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m proxy.loopback", description=__doc__.splitlines()[0])
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
