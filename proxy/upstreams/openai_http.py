"""What the OpenAI-compatible families (completions, chat) share: the SDK client over our
transport, one call under the retry policy with the body read inside it, how a refusal of n or
of a prompt list is recognised, the usage, and the readiness probe.

The body is read inside the retry loop: a 200 that is not a usable answer (cut short, not JSON,
no choices) is asked again like a 5xx rather than failing the whole search; only answers that
were read are billed.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import httpx2
import openai
from pydantic import BaseModel, ValidationError

from proxy.config import UpstreamConfig, upstream_api_key
from proxy.protocol.engine import EngineUsage
from proxy.types import Continuation, Probe, SampleResult, Usage
from proxy.upstreams.base import Upstream
from proxy.upstreams.capability import Capability
from proxy.upstreams.aiohttp_transport import AiohttpTransport
from proxy.upstreams.retry import retrying

Answer = TypeVar("Answer", bound=BaseModel)


def sdk_client(base_url: str | None, api_key: str, timeout_s: float) -> openai.AsyncOpenAI:
    """The SDK client over our aiohttp transport, SDK retries off (one retry policy: ours)."""
    http = httpx2.AsyncClient(transport=AiohttpTransport(), timeout=timeout_s, follow_redirects=True)
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s, http_client=http)


def new_client(cfg: UpstreamConfig) -> openai.AsyncOpenAI:
    return sdk_client(cfg.base_url, upstream_api_key(cfg).get_secret_value(), cfg.timeout_s)


def _complaint(exc: openai.APIStatusError) -> tuple[str | None, str]:
    body = exc.body if isinstance(exc.body, dict) else {}
    return body.get("param"), str(body.get("message") or exc.message).lower()


def refuses_n(exc: BaseException) -> bool:
    """A client error about `n` (a 400, or a 422 from a schema-validating API such as Mistral's)."""
    if not isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError)):
        return False
    param, msg = _complaint(exc)
    return param == "n" or "'n'" in msg or " n " in f" {msg} " or "n>1" in msg.replace(" ", "") or "n must be 1" in msg


def about_prompt(exc: openai.BadRequestError) -> bool:
    param, msg = _complaint(exc)
    return param == "prompt" or "prompt" in msg


def usage_of(usage: EngineUsage | None) -> Usage:
    return Usage(usage.prompt_tokens, usage.completion_tokens) if usage is not None else Usage()


def malformed(raw: httpx2.Response, problem: str) -> openai.APIResponseValidationError:
    return openai.APIResponseValidationError(response=raw, body=None,
                                             message=f"the upstream's answer is malformed: {problem}")


async def post(client: openai.AsyncOpenAI, cfg: UpstreamConfig, limit: asyncio.Semaphore, path: str,
               body: dict[str, Any], read: Callable[[httpx2.Response], Answer]) -> Answer:
    """One API call under the retry policy and the concurrency limit; `read` turns the 200 into
    an answer or raises `malformed(...)`, which is retried."""
    async for attempt in retrying(cfg.max_attempts, cfg.backoff_initial_s, cfg.backoff_max_s):
        with attempt:
            async with limit:
                raw = await client.post(path, body=body, cast_to=httpx2.Response)
            answer = read(raw)
    return answer


def read_as(model: type[Answer], raw: httpx2.Response) -> Answer:
    """The 200's body as `model` with at least one choice, or `malformed`."""
    try:
        answer = model.model_validate_json(raw.content)
    except ValidationError as e:
        raise malformed(raw, e.errors()[0]["msg"]) from None
    if not getattr(answer, "choices", None):
        raise malformed(raw, "no choices")
    return answer


class OpenAICompatibleUpstream(Upstream):
    """What an OpenAI-compatible family holds: the config, the SDK client, the concurrency limit,
    what n does; one billed call (`call`), closing, and the probe."""

    def __init__(self, cfg: UpstreamConfig, client: openai.AsyncOpenAI | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self.client = client or new_client(cfg)
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self.n_choices = Capability("n>1", self.name, known=cfg.supports_n)

    async def call(self, path: str, body: dict[str, Any], seed: int | None,
                   read: Callable[[httpx2.Response], Answer]) -> Answer:
        """One API call (the seed under `seed_param`), retried, billed as it returns."""
        if seed is not None and self.cfg.seed_param is not None:
            body = {**body, self.cfg.seed_param: seed}
        answer = await post(self.client, self.cfg, self._limit, path, body, read)
        self.record(usage_of(getattr(answer, "usage", None)))
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


def probe_failure(exc: openai.APIError) -> Probe:
    """Why a probe failed, in the words every family uses (another SDK's failure is first
    translated to the openai exception of the same meaning)."""
    if isinstance(exc, openai.APIStatusError):
        return Probe(False, f"refused: HTTP {exc.status_code}")
    if isinstance(exc, openai.APIConnectionError):
        return Probe(False, f"unreachable: {type(exc).__name__}")
    return Probe(False, f"failed: {type(exc).__name__}")


async def probe_models(client: openai.AsyncOpenAI, cfg: UpstreamConfig) -> Probe:
    """GET /models once, without retries (reachability now, not eventually), and look for the
    configured model in what it lists."""
    try:
        page = await client.with_options(timeout=min(5.0, cfg.timeout_s), max_retries=0).models.list()
    except openai.APIError as e:
        return probe_failure(e)
    listed = {m.id for m in page.data}
    if listed and cfg.model not in listed and not page.has_next_page():
        return Probe(False, f"model unknown: the upstream does not list {cfg.model!r}")
    return Probe(True, "reachable")
