"""OpenAI completions API (gpt-3.5-turbo-instruct, davinci-002, vLLM, any compatible server).

One request with n=K per beam; servers that refuse n>1 (a 400 naming `n`) or silently
return fewer choices get the missing samples as parallel n=1 requests, and the upstream
remembers not to ask for n>1 again.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import openai
from openai.types import Completion

from proxy.config import UpstreamConfig, upstream_api_key
from proxy.cost import count_tokens
from proxy.upstreams.base import Continuation, SampleResult, Upstream, Usage
from proxy.upstreams.retry import retrying

log = logging.getLogger("w2s.upstream")


def _refuses_n(exc: openai.BadRequestError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    if body.get("param") == "n":
        return True
    msg = str(body.get("message") or exc.message).lower()
    return "'n'" in msg or " n " in f" {msg} " or "n>1" in msg.replace(" ", "") or "n must be 1" in msg


def _seeded(kwargs: dict[str, object], seed: int | None) -> dict[str, object]:
    return kwargs if seed is None else {**kwargs, "seed": seed}


class OpenAICompletionsUpstream(Upstream):
    def __init__(self, cfg: UpstreamConfig, client: openai.AsyncOpenAI | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self.client = client or openai.AsyncOpenAI(
            base_url=cfg.base_url,
            api_key=upstream_api_key(cfg).get_secret_value(),
            max_retries=0,  # one retry policy: ours
            timeout=cfg.timeout_s,
        )
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self.supports_n = True
        self.calls = 0
        self.usage = Usage()

    async def aclose(self) -> None:
        await self.client.close()

    async def _create(self, **kwargs: object) -> Completion:
        """One API call under the retry policy and the concurrency limit."""
        async for attempt in retrying(self.cfg.max_attempts, self.cfg.backoff_initial_s, self.cfg.backoff_max_s):
            with attempt:
                async with self._limit:
                    resp = await self.client.completions.create(**kwargs)  # type: ignore[call-overload]
        self.calls += 1
        return resp

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
