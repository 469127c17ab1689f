"""OpenAI completions API (gpt-3.5-turbo-instruct, davinci-002, vLLM, any compatible server).

The conversation is rendered through the upstream's template (proxy.prompts.render) and the
partial answer appended: the prompt a completions model continues.

One request with n=K per beam; servers that refuse n>1 (a 400 naming `n`) or silently
return fewer choices get the missing samples as parallel n=1 requests (seeded per sample,
`proxy.types.sample_seed`). The beams of a search step go in one request too (`prompt` as a
list, up to `max_prompts_per_call`; choices come back prompt-major by `index`; seeded from all
the beams' seeds, `proxy.types.request_seed`): fewer requests against the API's rate limit and
less CPU per beam. A server that refuses a list, or answers it with the wrong choices, is asked
one prompt per request. What the upstream honours is learned per upstream and never switched
off for good by one odd answer (proxy.upstreams.capability); the requests it billed are still
counted, in the result and in the running `usage`.

The request goes through `AsyncOpenAI.post` (auth, headers, status errors and timeouts are
the SDK's) over our aiohttp transport, and the body is read by our own pydantic model: the
SDK's typed `completions.create` spends more CPU per call building and parsing models than
the whole guidance server spends on a request, and a server under 64-way load felt it.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

import httpx2
import openai
from pydantic import ValidationError

from proxy.config import UpstreamConfig, upstream_api_key
from proxy.cost import count_tokens
from proxy.protocol.engine import EngineCompletion as Completion
from proxy.prompts import render
from proxy.types import Continuation, Conversation, Probe, SampleResult, SamplingParams, Usage, request_seed
from proxy.upstreams.aiohttp_transport import AiohttpTransport
from proxy.upstreams.base import Upstream
from proxy.upstreams.capability import Capability, n_choices
from proxy.upstreams.retry import retrying

log = logging.getLogger("w2s.upstream")


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


def _read(raw: httpx2.Response) -> Completion:
    """The body of a 200, or APIResponseValidationError (retried, like a 5xx) when it is not a
    usable answer: not JSON or cut short, no choices at all, or a choice cut at the length
    limit with no text (a length finish spends max_tokens; an empty one would count as a chunk)."""
    try:
        resp = Completion.model_validate_json(raw.content)
    except ValidationError as e:
        problem = e.errors()[0]["msg"]
    else:
        if not resp.choices:
            problem = "no choices"
        elif any(c.finish_reason == "length" and not c.text for c in resp.choices):
            problem = "an empty choice cut at the length limit"
        else:
            return resp
    raise openai.APIResponseValidationError(response=raw, body=None,
                                            message=f"the upstream's completion is malformed: {problem}")


def _all_choices(resp: Completion, expected: int) -> bool:
    return sorted(c.index for c in resp.choices) == list(range(expected))


def _usage_of(resp: Completion) -> Usage:
    return Usage(resp.usage.prompt_tokens, resp.usage.completion_tokens) if resp.usage else Usage()


class OpenAICompletionsUpstream(Upstream):
    def __init__(self, cfg: UpstreamConfig, client: openai.AsyncOpenAI | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self.client = client or new_client(cfg)
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self.n_choices = Capability("n>1", self.name, known=cfg.supports_n)
        self.prompt_lists = Capability("lists of prompts", self.name, known=cfg.supports_prompt_lists)

    @property  # type: ignore[override]
    def max_prompts_per_call(self) -> int:
        return self.cfg.max_prompts_per_call if self.prompt_lists.on and self.n_choices.on else 1

    async def aclose(self) -> None:
        await self.client.close()

    async def _create(self, body: dict[str, object], seed: int | None) -> Completion:
        """One API call under the retry policy and the concurrency limit, billed as it returns."""
        if seed is not None:
            body = {**body, "seed": seed}
        async for attempt in retrying(self.cfg.max_attempts, self.cfg.backoff_initial_s, self.cfg.backoff_max_s):
            with attempt:
                async with self._limit:
                    raw = await self.client.post("/completions", body=body, cast_to=httpx2.Response)
                resp = _read(raw)  # inside the retry: a malformed or truncated 200 is asked again
        self.record(_usage_of(resp))
        return resp

    def _prompt_budget(self, prompt: str, max_tokens: int) -> int:
        if self.cfg.context_window is None:
            return max_tokens
        return min(max_tokens, self.cfg.context_window - count_tokens(prompt, self.cfg.encoding))

    def _body(self, prompt: str | list[str], params: SamplingParams, max_tokens: int) -> dict[str, object]:
        body: dict[str, object] = dict(model=self.cfg.model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=params.temperature, top_p=params.top_p)
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        return await self.sample_prompt(render(conversation, self.cfg) + partial, params)

    async def sample_prompt(self, prompt: str, params: SamplingParams) -> SampleResult:
        """`params.n` continuations of one completion prompt, as sent."""
        n = params.n
        max_tokens = self._prompt_budget(prompt, params.max_tokens)
        if max_tokens < 1:  # the context window is full: nothing more can be generated
            return SampleResult([Continuation("", False, 0, "length")] * n, Usage(), 0)
        body = self._body(prompt, params, max_tokens)
        responses = await n_choices(n, params.seed, self.n_choices,
                                    lambda k, seed: self._create({**body, "n": k}, seed),
                                    lambda r: len(r.choices), _refuses_n)
        return self._collect(responses, n, max_tokens)

    async def sample_batch(self, conversation: Conversation, partials: Sequence[str], params: SamplingParams,
                           seeds: Sequence[int | None] | None = None) -> SampleResult:
        head = render(conversation, self.cfg)
        return await self.sample_prompts([head + p for p in partials], params, seeds)

    async def sample_prompts(self, prompts: Sequence[str], params: SamplingParams,
                             seeds: Sequence[int | None] | None = None) -> SampleResult:
        """All prompts in one request, seeded with `request_seed(seeds)` (the API takes one seed
        per request); one request per prompt, each with its own seed, where that cannot be."""
        seeds = list(seeds) if seeds is not None else [params.seed] * len(prompts)

        async def one_by_one() -> SampleResult:
            results = await asyncio.gather(*(self.sample_prompt(p, replace(params, seed=s))
                                             for p, s in zip(prompts, seeds, strict=True)))
            return SampleResult.joined(results)

        budgets = {self._prompt_budget(p, params.max_tokens) for p in prompts}
        if (len(prompts) == 1 or self.max_prompts_per_call == 1 or len(budgets) > 1 or min(budgets) < 1
                or not self.prompt_lists.use()):
            return await one_by_one()
        [max_tokens] = budgets
        body = {**self._body(list(prompts), params, max_tokens), "n": params.n}
        try:
            resp = await self._create(body, request_seed(seeds))
        except openai.BadRequestError as e:
            if _refuses_n(e):
                self.n_choices.refused(f"refused n={params.n}")
            elif not _about_prompt(e):
                raise
            alone = await one_by_one()
            if self.n_choices.on:  # each prompt alone was fine: the list was not
                self.prompt_lists.refused("refused a list of prompts")
            return alone
        expected = params.n * len(prompts)
        answered = self._collect([resp], expected, max_tokens)
        if _all_choices(resp, expected):
            self.prompt_lists.hit()
            return answered
        self.prompt_lists.miss(f"answered {len(prompts)} prompts with {len(resp.choices)} choices (expected {expected})")
        rest = await one_by_one()
        return SampleResult(rest.continuations, rest.usage + answered.usage, rest.calls + answered.calls)

    def _collect(self, responses: list[Completion], n: int, max_tokens: int) -> SampleResult:
        usage = Usage()
        conts: list[Continuation] = []
        for resp in responses:
            usage = usage + _usage_of(resp)
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
        return SampleResult(conts[:n], usage, len(responses))

    async def probe(self) -> Probe:
        """GET /models once, without retries (reachability now, not eventually), and look for
        the configured model in what it lists."""
        try:
            page = await self.client.with_options(timeout=min(5.0, self.cfg.timeout_s), max_retries=0).models.list()
        except openai.APIStatusError as e:
            return Probe(False, f"refused: HTTP {e.status_code}")
        except openai.APIConnectionError as e:
            return Probe(False, f"unreachable: {type(e).__name__}")
        except openai.APIError as e:
            return Probe(False, f"failed: {type(e).__name__}")
        listed = {m.id for m in page.data}
        if listed and self.cfg.model not in listed and not page.has_next_page():
            return Probe(False, f"model unknown: the upstream does not list {self.cfg.model!r}")
        return Probe(True, "reachable")
