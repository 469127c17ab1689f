"""OpenAI completions API (gpt-3.5-turbo-instruct, davinci-002, vLLM, any compatible server).

The conversation is rendered through the upstream's template (proxy.prompts.render) and the
partial answer appended: the prompt a completions model continues. `extra_body` adds provider
fields under ours (as in the chat family), never overriding what the search decides.

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

from proxy.config import OpenAICompletionsConfig
from proxy.cost import count_tokens
from proxy.prompts import render
from proxy.types import Continuation, Conversation, SampleResult, SamplingParams, request_seed
from proxy.upstreams.base import conversation_key
from proxy.upstreams.capability import Capability, n_choices
from proxy.upstreams.errors import UpstreamError, malformed
from proxy.upstreams.openai_http import OpenAICompatibleUpstream, about_prompt, read_as, refuses_n
from proxy.upstreams.reading import CompletionAnswer as Completion
from proxy.upstreams.reading import CompletionChoice
from proxy.upstreams.seam import hold_trailing_whitespace, join_held

log = logging.getLogger("w2s.upstream")


def _read(raw: httpx2.Response) -> Completion:
    """The completion in a 200, or `malformed` (retried, like a 5xx): not JSON or cut short, no
    choices, or a choice cut at the length limit with no text (a length finish spends max_tokens;
    an empty one would count as a chunk of L tokens)."""
    resp = read_as(Completion, raw)
    if any(c.finish_reason == "length" and not c.text for c in resp.choices):
        raise malformed("an empty choice cut at the length limit")
    return resp


def _all_choices(resp: Completion, expected: int) -> bool:
    return sorted(c.index for c in resp.choices) == list(range(expected))


class OpenAICompletionsUpstream(OpenAICompatibleUpstream):
    cfg: OpenAICompletionsConfig

    def __init__(self, cfg: OpenAICompletionsConfig, client: openai.AsyncOpenAI | None = None) -> None:
        super().__init__(cfg, client)
        self.prompt_lists = Capability("lists of prompts", self.name, known=cfg.supports_prompt_lists)

    @property  # type: ignore[override]
    def max_prompts_per_call(self) -> int:
        return self.cfg.max_prompts_per_call if self.prompt_lists.on and self.n_choices.on else 1

    async def _create(self, body: dict[str, object], seed: int | None, cache_key: str | None) -> Completion:
        """One API call under the retry policy and the concurrency limit, billed as it returns."""
        return await self.call("/completions", body, seed, _read, cache_key)

    def _body(self, prompt: str | list[str], params: SamplingParams, max_tokens: int) -> dict[str, object]:
        """Everything but n and the seed; `extra_body` under our fields."""
        body: dict[str, object] = dict(self.cfg.extra_body)
        body.update(model=self.cfg.model, prompt=prompt, max_tokens=max_tokens, temperature=params.temperature,
                    top_p=params.top_p)
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        return await self.sample_batch(conversation, [partial], params, [params.seed])

    async def sample_prompt(self, prompt: str, params: SamplingParams) -> SampleResult:
        """`params.n` continuations of one completion prompt, as sent."""
        n = params.n
        max_tokens = self.room([prompt], params.max_tokens)
        if max_tokens < 1:  # the context window is full: nothing more can be generated
            return self.window_full(n)
        body = self._body(prompt, params, max_tokens)
        responses = await n_choices(n, params.seed, self.n_choices,
                                    lambda k, seed: self._create({**body, "n": k}, seed, params.cache_key),
                                    lambda r: len(r.choices), refuses_n, stagger=self.cfg.stagger_twins)
        return self._collect(responses, n, max_tokens)

    async def sample_batch(self, conversation: Conversation, partials: Sequence[str], params: SamplingParams,
                           seeds: Sequence[int | None] | None = None) -> SampleResult:
        """The template's prompt + each partial answer. With `hold_trailing_whitespace` a partial is
        sent without its trailing whitespace (a tokenizer that attaches a space to the next word
        would otherwise see a lone space token the model never wrote, and continue differently)
        and each continuation is joined on exactly (proxy.upstreams.seam)."""
        head = render(conversation, self.cfg)
        params = replace(params, cache_key=conversation_key(conversation))
        if not self.cfg.hold_trailing_whitespace:
            return await self.sample_prompts([head + p for p in partials], params, seeds)
        sent, held = zip(*(hold_trailing_whitespace(p) for p in partials))
        res = await self.sample_prompts([head + p for p in sent], params, seeds)
        n = params.n
        joined = [replace(c, text=join_held(held[i // n], c.text)) for i, c in enumerate(res.continuations)]
        return replace(res, continuations=joined)

    async def sample_prompts(self, prompts: Sequence[str], params: SamplingParams,
                             seeds: Sequence[int | None] | None = None) -> SampleResult:
        """All prompts in one request, seeded with `request_seed(seeds)` (the API takes one seed
        per request); one request per prompt, each with its own seed, where that cannot be."""
        seeds = list(seeds) if seeds is not None else [params.seed] * len(prompts)

        async def one_by_one(as_seeded: Sequence[int | None] = seeds) -> SampleResult:
            results = await asyncio.gather(*(self.sample_prompt(p, replace(params, seed=s))
                                             for p, s in zip(prompts, as_seeded, strict=True)))
            return SampleResult.joined(results)

        budgets = {self.room([p], params.max_tokens) for p in prompts}
        if (len(prompts) == 1 or self.max_prompts_per_call == 1 or len(budgets) > 1 or min(budgets) < 1
                or not self.prompt_lists.use()):
            return await one_by_one()
        [max_tokens] = budgets
        body = {**self._body(list(prompts), params, max_tokens), "n": params.n}
        seed = request_seed(seeds)
        try:
            resp = await self._create(body, seed, params.cache_key)
        except UpstreamError as e:
            if e.status != 400:
                raise
            if refuses_n(e):
                self.n_choices.refused(f"refused n={params.n}")
            elif not about_prompt(e):
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
        # Each prompt alone under the list's one seed: on a server that seeds per prompt and
        # choice, exactly the samples the whole list would have had (a seeded answer stays the same).
        rest = await one_by_one([seed] * len(prompts))
        return SampleResult(rest.continuations, rest.usage + answered.usage, rest.calls + answered.calls)

    def _collect(self, responses: list[Completion], n: int, max_tokens: int) -> SampleResult:
        def continuation(c: CompletionChoice, resp: Completion, choices: int) -> Continuation:
            if c.finish_reason == "length":
                used = max_tokens
            elif choices == 1 and resp.usage is not None:
                used = resp.usage.completion_tokens
            else:
                used = count_tokens(c.text, self.cfg.encoding)
            return Continuation(c.text, c.finish_reason != "length", used, c.finish_reason)

        return self.collect(responses, n, continuation)
