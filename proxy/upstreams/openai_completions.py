"""OpenAI completions API (gpt-3.5-turbo-instruct, davinci-002, vLLM, any compatible server).

One request with n=K per beam; servers that refuse n>1 (a 400 naming `n`) or silently
return fewer choices get the missing samples as parallel n=1 requests, and the upstream
remembers not to ask for n>1 again. The beams of a search step go in one request too
(`prompt` as a list, up to `max_prompts_per_call`; choices come back prompt-major by
`index`): fewer requests against the API's rate limit and less CPU per beam. A server that
refuses a list, or answers it with the wrong choices, is asked one prompt per request from
then on; the requests it billed are still counted.

The request goes through `AsyncOpenAI.post` (auth, headers, status errors and timeouts are
the SDK's) over our aiohttp transport, and the body is read by our own pydantic model: the
SDK's typed `completions.create` spends more CPU per call building and parsing models than
the whole guidance server spends on a request, and a server under 64-way load felt it.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence

import httpx2
import openai
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.config import UpstreamConfig, upstream_api_key
from proxy.cost import count_tokens
from proxy.upstreams.aiohttp_transport import AiohttpTransport
from proxy.upstreams.base import Continuation, SampleResult, Upstream, Usage
from proxy.upstreams.retry import retrying

log = logging.getLogger("w2s.upstream")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CompletionChoice(_Lenient):
    text: str
    index: int = 0
    finish_reason: str | None = None


class CompletionUsage(_Lenient):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Completion(_Lenient):
    """What we read of a completions response; extra fields (logprobs, ids) are ignored."""

    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


def new_client(cfg: UpstreamConfig) -> openai.AsyncOpenAI:
    """The SDK client over our aiohttp transport, SDK retries off (one retry policy: ours)."""
    http = httpx2.AsyncClient(transport=AiohttpTransport(), timeout=cfg.timeout_s, follow_redirects=True)
    return openai.AsyncOpenAI(base_url=cfg.base_url, api_key=upstream_api_key(cfg).get_secret_value(),
                              max_retries=0, timeout=cfg.timeout_s, http_client=http)


def _refuses_n(exc: openai.BadRequestError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    if body.get("param") == "n":
        return True
    msg = str(body.get("message") or exc.message).lower()
    return "'n'" in msg or " n " in f" {msg} " or "n>1" in msg.replace(" ", "") or "n must be 1" in msg


def _about_prompt(exc: openai.BadRequestError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    return body.get("param") == "prompt" or "prompt" in str(body.get("message") or exc.message).lower()


def _all_choices(resp: Completion, expected: int) -> bool:
    return sorted(c.index for c in resp.choices) == list(range(expected))


def _seeded(kwargs: dict[str, object], seed: int | None) -> dict[str, object]:
    return kwargs if seed is None else {**kwargs, "seed": seed}


class OpenAICompletionsUpstream(Upstream):
    def __init__(self, cfg: UpstreamConfig, client: openai.AsyncOpenAI | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self.client = client or new_client(cfg)
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self.supports_n = True
        self.supports_prompt_lists = True
        self.calls = 0
        self.usage = Usage()

    @property  # type: ignore[override]
    def max_prompts_per_call(self) -> int:
        return self.cfg.max_prompts_per_call if self.supports_prompt_lists and self.supports_n else 1

    async def aclose(self) -> None:
        await self.client.close()

    async def _create(self, **kwargs: object) -> Completion:
        """One API call under the retry policy and the concurrency limit."""
        async for attempt in retrying(self.cfg.max_attempts, self.cfg.backoff_initial_s, self.cfg.backoff_max_s):
            with attempt:
                async with self._limit:
                    raw = await self.client.post("/completions", body=kwargs, cast_to=httpx2.Response)
        self.calls += 1
        try:
            return Completion.model_validate_json(raw.content)
        except ValidationError as e:
            raise openai.APIResponseValidationError(
                response=raw, body=None, message=f"the upstream's completion is malformed: {e.errors()[0]['msg']}"
            ) from None

    def _prompt_budget(self, prompt: str, max_tokens: int) -> int:
        if self.cfg.context_window is None:
            return max_tokens
        return min(max_tokens, self.cfg.context_window - count_tokens(prompt, self.cfg.encoding))

    async def sample(
        self,
        prompt: str,
        *,
        n: int,
        max_tokens: int,
        stop: Sequence[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> SampleResult:
        max_tokens = self._prompt_budget(prompt, max_tokens)
        if max_tokens < 1:  # the context window is full: nothing more can be generated
            return SampleResult([Continuation("", False, 0, "length")] * n, Usage(), 0)
        common: dict[str, object] = dict(model=self.cfg.model, prompt=prompt, max_tokens=max_tokens,
                                         temperature=temperature, top_p=top_p)
        if stop:
            common["stop"] = list(stop)
        responses: list[Completion] = []
        if n > 1 and self.supports_n:
            try:
                responses.append(await self._create(n=n, **_seeded(common, seed)))
            except openai.BadRequestError as e:
                if not _refuses_n(e):
                    raise
                log.info("upstream %s refused n=%d; falling back to parallel n=1 requests", self.name, n)
                self.supports_n = False
        missing = n - sum(len(r.choices) for r in responses)
        if missing > 0 and responses:
            self.supports_n = False  # it answered with fewer choices than asked
        if missing > 0:
            base = 0 if seed is None else seed + (n - missing)
            singles = await asyncio.gather(*(
                self._create(n=1, **_seeded(common, None if seed is None else base + i)) for i in range(missing)
            ))
            responses.extend(singles)
        return self._collect(responses, n, max_tokens)

    async def sample_batch(
        self,
        prompts: Sequence[str],
        *,
        n: int,
        max_tokens: int,
        stop: Sequence[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seeds: Sequence[int | None] | None = None,
    ) -> SampleResult:
        """All prompts in one request, seeded with the first seed (the API takes one per request)."""
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        one_by_one = functools.partial(super().sample_batch, prompts, n=n, max_tokens=max_tokens, stop=stop,
                                       temperature=temperature, top_p=top_p, seeds=seeds)
        budgets = {self._prompt_budget(p, max_tokens) for p in prompts}
        if len(prompts) == 1 or self.max_prompts_per_call == 1 or len(budgets) > 1 or min(budgets) < 1:
            return await one_by_one()
        common: dict[str, object] = dict(model=self.cfg.model, prompt=list(prompts), n=n, max_tokens=max_tokens,
                                         temperature=temperature, top_p=top_p)
        if stop:
            common["stop"] = list(stop)
        try:
            resp = await self._create(**_seeded(common, seeds[0]))
        except openai.BadRequestError as e:
            if _refuses_n(e):
                log.info("upstream %s refused n=%d; falling back to parallel n=1 requests", self.name, n)
                self.supports_n = False
            elif not _about_prompt(e):
                raise
            alone = await one_by_one()
            if self.supports_n and self.supports_prompt_lists:  # each prompt alone was fine: the list was not
                log.info("upstream %s refused a list of prompts; sending one prompt per request", self.name)
                self.supports_prompt_lists = False
            return alone
        expected = n * len(prompts)
        answered = self._collect([resp], expected, max_tokens)
        if _all_choices(resp, expected):
            return answered
        log.info("upstream %s answered %d prompts with %d choices (expected %d); sending one prompt per request",
                 self.name, len(prompts), len(resp.choices), expected)
        self.supports_prompt_lists = False
        rest = await one_by_one()
        return SampleResult(rest.continuations, rest.usage + answered.usage, rest.calls + answered.calls)

    def _collect(self, responses: list[Completion], n: int, max_tokens: int) -> SampleResult:
        usage = Usage()
        conts: list[Continuation] = []
        for resp in responses:
            u = Usage(resp.usage.prompt_tokens, resp.usage.completion_tokens) if resp.usage else Usage()
            usage = usage + u
            choices = sorted(resp.choices, key=lambda c: c.index)
            for c in choices:
                reason = c.finish_reason
                if reason == "length":
                    used = max_tokens
                elif len(choices) == 1 and resp.usage is not None:
                    used = resp.usage.completion_tokens
                else:
                    used = count_tokens(c.text, self.cfg.encoding)
                conts.append(Continuation(c.text, reason != "length", used, reason))
        self.usage = self.usage + usage
        return SampleResult(conts[:n], usage, len(responses))
