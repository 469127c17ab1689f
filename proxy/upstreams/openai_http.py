"""What the OpenAI-compatible families (completions, chat) share: the SDK client over our
transport, one call under the retry policy with the body read inside it, the openai SDK's errors
translated into ours, how a refusal of n or of a prompt list is recognised, the usage, and the
readiness probe.

The body is read inside the retry loop: a 200 that is not a usable answer (cut short, not JSON,
no choices) is asked again like a 5xx rather than failing the whole search; only answers that
were read are billed. The SDK's errors become `UpstreamError` inside the retried call
(`openai_errors`), so the retry policy and everything above it see only ours.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import httpx2
import openai
from pydantic import BaseModel, ValidationError

from proxy import tracing
from proxy.config import OpenAICompatibleConfig, upstream_api_key
from proxy.types import Continuation, Probe, SampleResult, Usage
from proxy.upstreams.aiohttp_transport import AiohttpTransport
from proxy.upstreams.base import Upstream
from proxy.upstreams.capability import Capability
from proxy.upstreams.errors import UpstreamError, malformed, probe_failure, retry_after_from
from proxy.upstreams.reading import AnswerUsage
from proxy.upstreams.retry import retrying

Answer = TypeVar("Answer", bound=BaseModel)


def sdk_client(base_url: str | None, api_key: str, timeout_s: float) -> openai.AsyncOpenAI:
    """The SDK client over our aiohttp transport, SDK retries off (one retry policy: ours)."""
    http = httpx2.AsyncClient(transport=AiohttpTransport(), timeout=timeout_s, follow_redirects=True)
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s, http_client=http)


def new_client(cfg: OpenAICompatibleConfig) -> openai.AsyncOpenAI:
    return sdk_client(cfg.base_url, upstream_api_key(cfg).get_secret_value(), cfg.timeout_s)


def _complaint(exc: openai.APIStatusError) -> tuple[str | None, str]:
    body = exc.body if isinstance(exc.body, dict) else {}
    return body.get("param"), str(body.get("message") or exc.message).lower()


def _refused(exc: openai.APIStatusError) -> set[str]:
    """The request fields a client error complains about, as far as we use them: `n` (a 400, or
    a 422 from a schema-validating API such as Mistral's) and `prompt` (a 400)."""
    if exc.status_code not in (400, 422):
        return set()
    param, msg = _complaint(exc)
    fields = set()
    if param == "n" or "'n'" in msg or " n " in f" {msg} " or "n>1" in msg.replace(" ", "") or "n must be 1" in msg:
        fields.add("n")
    if exc.status_code == 400 and (param == "prompt" or "prompt" in msg):
        fields.add("prompt")
    return fields


def from_openai(exc: openai.APIError) -> UpstreamError:
    """Ours for an openai SDK error. The upstream's message is read only to learn which request
    field a refusal names (`refused`), never kept."""
    if isinstance(exc, openai.APITimeoutError):  # before its base class, APIConnectionError
        return UpstreamError("timeout")
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamError("connection")
    if isinstance(exc, openai.APIStatusError):
        return UpstreamError("http", status=exc.status_code, retry_after=retry_after_from(exc.response.headers),
                             refused=_refused(exc))
    return malformed("the SDK could not read it")  # APIResponseValidationError, or an error in a 200


@contextlib.contextmanager
def openai_errors() -> Iterator[None]:
    """Around an openai SDK call: its errors raised as ours (`from_openai`), the SDK's as the cause."""
    try:
        yield
    except openai.APIError as e:
        raise from_openai(e) from e


def refuses_n(exc: BaseException) -> bool:
    """A client error about `n` (a 400, or a 422 from a schema-validating API such as Mistral's)."""
    return isinstance(exc, UpstreamError) and "n" in exc.refused


def about_prompt(exc: UpstreamError) -> bool:
    return "prompt" in exc.refused


def usage_of(usage: AnswerUsage | None) -> Usage:
    """The answer's usage with its cache split (proxy.upstreams.reading.AnswerUsage)."""
    if usage is None:
        return Usage()
    prompt = usage.billed_prompt_tokens
    cached = min(usage.cached_tokens, prompt)
    return Usage(prompt, usage.completion_tokens, cached, min(usage.cache_write_tokens, prompt - cached))


async def post(client: openai.AsyncOpenAI, cfg: OpenAICompatibleConfig, limit: asyncio.Semaphore, path: str,
               body: dict[str, Any], read: Callable[[httpx2.Response], Answer],
               headers: dict[str, str] | None = None) -> Answer:
    """One API call under the retry policy and the concurrency limit; `read` turns the 200 into
    an answer or raises `malformed(...)`, which is retried."""
    options: Any = {"headers": headers} if headers else {}
    async for attempt in retrying(cfg.max_attempts, cfg.backoff_initial_s, cfg.backoff_max_s):
        with attempt:
            async with limit:
                with openai_errors():
                    raw = await client.post(path, body=body, cast_to=httpx2.Response, options=options)
            answer = read(raw)
    return answer


CACHED_HEADER = "fireworks-cached-prompt-tokens"
"""Fireworks reports the prompt tokens its cache served in this response header."""


def read_as(model: type[Answer], raw: httpx2.Response) -> Answer:
    """The 200's body as `model` with at least one choice, or `malformed`."""
    try:
        answer = model.model_validate_json(raw.content)
    except ValidationError as e:
        raise malformed(e.errors()[0]["msg"]) from None
    if not getattr(answer, "choices", None):
        raise malformed("no choices")
    usage = getattr(answer, "usage", None)
    header = raw.headers.get(CACHED_HEADER, "").strip()
    if usage is not None and header.isdigit():
        usage.cached_from_header = int(header)
    return answer


class OpenAICompatibleUpstream(Upstream):
    """What an OpenAI-compatible family holds: the config, the SDK client, the concurrency limit,
    what n does; one billed call (`call`), closing, and the probe."""

    def __init__(self, cfg: OpenAICompatibleConfig, client: openai.AsyncOpenAI | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self.context_window, self.encoding = cfg.context_window, cfg.encoding
        self.client = client or new_client(cfg)
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self.n_choices = Capability("n>1", self.name, known=cfg.supports_n)

    async def call(self, path: str, body: dict[str, Any], seed: int | None,
                   read: Callable[[httpx2.Response], Answer], cache_key: str | None = None) -> Answer:
        """One API call (the seed under `seed_param`, the cache key where `cache_affinity` says),
        retried, billed as it returns."""
        if seed is not None and self.cfg.seed_param is not None:
            body = {**body, self.cfg.seed_param: seed}
        headers: dict[str, str] = {}
        if cache_key is not None and self.cfg.cache_affinity == "prompt_cache_key":
            body = {**body, "prompt_cache_key": cache_key}
        elif cache_key is not None and self.cfg.cache_affinity == "x-session-affinity":
            headers["x-session-affinity"] = cache_key
        with tracing.upstream_call(self.cfg.kind, self.cfg.model, body.get("n", 1)) as span:
            answer = await post(self.client, self.cfg, self._limit, path, body, read, headers)
            usage = usage_of(getattr(answer, "usage", None))
            span.usage(usage)
        self.record(usage)
        return answer

    @staticmethod
    def collect(answers: Sequence[Any], n: int, continuation: Callable[[Any, Any, int], Continuation]) -> SampleResult:
        """The first `n` choices of `answers` in order (each answer's by index) as continuations,
        `continuation(choice, answer, choices in that answer)`; usage summed over every answer."""
        usage = Usage()
        conts: list[Continuation] = []
        for answer in answers:
            usage = usage + usage_of(answer.usage)
            choices = sorted(answer.choices, key=lambda c: c.index)
            conts.extend(continuation(c, answer, len(choices)) for c in choices)
        return SampleResult(conts[:n], usage, len(answers))

    async def aclose(self) -> None:
        await self.client.close()

    async def probe(self) -> Probe:
        return await probe_models(self.client, self.cfg)


async def probe_models(client: openai.AsyncOpenAI, cfg: OpenAICompatibleConfig) -> Probe:
    """GET /models once, without retries (reachability now, not eventually), and look for the
    configured model in what it lists."""
    try:
        with openai_errors():
            page = await client.with_options(timeout=min(5.0, cfg.timeout_s), max_retries=0).models.list()
    except UpstreamError as e:
        return probe_failure(e)
    listed = {m.id for m in page.data}
    if listed and cfg.model not in listed and not page.has_next_page():
        return Probe("model unknown", f"the upstream does not list {cfg.model!r}")
    return Probe("reachable")
