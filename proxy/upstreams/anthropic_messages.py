"""Anthropic's Messages API (Claude) through the `anthropic` SDK.

The conversation becomes `system` (its system turns, joined) and alternating user/assistant
messages (consecutive turns of one role merged into one turn of several text blocks); the
partial answer is a final assistant turn, a prefill the model continues without repeating it.

What the API lacks and how the search still gets what it needs:
- No `n`, no seed: every one of the K samples is its own request, all in parallel under
  `max_concurrency` (a Capability known to be off, so n_choices never asks for n > 1).
- A final assistant turn ending in whitespace is refused (400): the trailing whitespace of the
  partial answer is always held back and the continuation joined on (proxy.upstreams.seam), so
  no character is lost or doubled (this family has no `hold_trailing_whitespace` to set).
- Whitespace-only stop sequences are refused (400): they are not sent, and the upstream cuts
  the text at them itself; the others go as `stop_sequences`.
- Temperature is 0..1 (400 above): a higher one is clamped to 1.0, the model's own
  distribution and the most diverse it offers, with a warning once per upstream. Refusing would
  fail a search configured for an API that takes 2 in the middle of a run, for a knob that
  only shapes the candidates. `top_p` is sent only below 1 (no effect at 1), since newer models
  refuse `temperature` and `top_p` together.
- Claude 4.6 and later refuse any prefill (400): that model cannot continue a partial answer,
  so this upstream cannot work with it. It fails with `PrefillUnsupportedError` (an
  `UpstreamError` of kind "unsuitable", in our words), never retried;
  the first prefilled request goes alone so a search finds out with one request rather than
  W*K, and later prefills fail at once without a request.
- Reasoning blocks (`thinking`, `redacted_thinking`) are never part of the answer.

Errors: an anthropic SDK failure becomes our `UpstreamError` inside the retried call
(`from_anthropic`: its status, and its Retry-After / retry-after-ms headers, so the server's wait
is believed), with the SDK's as its cause; the one retry policy, the server's 502 / 504 and the
metrics read only ours. The SDK's own retries are off; its HTTP runs over our aiohttp transport,
as the openai family's does (proxy.upstreams.aiohttp_transport says why).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import anthropic
import httpx2
from anthropic.types import Message

from proxy import tracing
from proxy.config import AnthropicConfig, upstream_api_key
from proxy.cost import count_tokens
from proxy.types import ChatMessage, Continuation, Conversation, Probe, SampleResult, SamplingParams, Usage, first_stop
from proxy.upstreams.aiohttp_transport import AiohttpTransport
from proxy.upstreams.anthropic_cache import Breakpoints
from proxy.upstreams.base import Upstream
from proxy.upstreams.capability import Capability, n_choices
from proxy.upstreams.errors import UpstreamError, malformed, probe_failure, retry_after_from
from proxy.upstreams.retry import retrying
from proxy.upstreams.seam import hold_trailing_whitespace, join_held

log = logging.getLogger("w2s.upstream")

MAX_TEMPERATURE = 1.0
SYSTEM_ROLES = ("system", "developer")


class PrefillUnsupportedError(UpstreamError):
    """The model refuses a final assistant turn: it cannot continue a partial answer. The message
    is ours (the API's own text is not repeated), so the server may show it to its client."""

    def __init__(self, model: str) -> None:
        super().__init__("unsuitable", f"{model} cannot continue a partial answer: it refuses an assistant prefill. "
                         "The anthropic upstream needs a model that accepts prefill (Claude 4.5 or earlier).",
                         status=400)


def from_anthropic(exc: anthropic.APIError, model: str) -> UpstreamError:
    """Ours for an anthropic SDK error. The API's message is read only to recognise a refused
    prefill, never kept."""
    if isinstance(exc, anthropic.APITimeoutError):  # before its base class, APIConnectionError
        return UpstreamError("timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return UpstreamError("connection")
    if isinstance(exc, anthropic.APIStatusError):
        said = exc.api_message or exc.message
        if exc.status_code == 400 and "prefill" in said.lower():
            return PrefillUnsupportedError(model)
        return UpstreamError("http", status=exc.status_code, retry_after=retry_after_from(exc.response.headers))
    return malformed("the SDK could not read it")  # APIResponseValidationError, or an error in a 200


def to_messages(conversation: Conversation, prefill: str) -> tuple[str, list[dict[str, Any]]]:
    """(system, messages) for the Messages API: system turns joined into the `system` field,
    same-role neighbours merged (the API refuses or merges them anyway), empty texts dropped
    (it refuses empty text blocks), `prefill` as the final assistant turn when not empty."""
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    chat: list[ChatMessage] = list(conversation.messages)
    if prefill:
        chat.append({"role": "assistant", "content": prefill})
    for m in chat:
        if m["role"] in SYSTEM_ROLES:
            system.append(m["content"])
        elif not m["content"]:
            continue
        elif turns and turns[-1][0] == m["role"]:
            turns[-1][1].append(m["content"])
        else:
            turns.append((m["role"], [m["content"]]))
    messages = [{"role": role, "content": texts[0] if len(texts) == 1 else [{"type": "text", "text": t} for t in texts]}
                for role, texts in turns]
    return "\n\n".join(s for s in system if s), messages


def usage_of(message: Message) -> Usage:
    """`input_tokens` counts only the tokens after the last cache breakpoint: the prompt billed
    is those, the cache reads and the cache writes (either absent or null: 0)."""
    u = message.usage
    read, write = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
    return Usage((u.input_tokens or 0) + read + write, u.output_tokens or 0, read, write)


def new_client(cfg: AnthropicConfig) -> anthropic.AsyncAnthropic:
    """The SDK client over our aiohttp transport, SDK retries off (one retry policy: ours); the
    key from `api_key_env` (ANTHROPIC_API_KEY unless the config names another)."""
    http = httpx2.AsyncClient(transport=AiohttpTransport(), timeout=cfg.timeout_s, follow_redirects=True)
    return anthropic.AsyncAnthropic(api_key=upstream_api_key(cfg).get_secret_value(), base_url=cfg.base_url,
                                    max_retries=0, timeout=cfg.timeout_s, http_client=http)


class AnthropicMessagesUpstream(Upstream):
    def __init__(self, cfg: AnthropicConfig, client: anthropic.AsyncAnthropic | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self.context_window, self.encoding = cfg.context_window, cfg.encoding
        self.client = client or new_client(cfg)
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self.n_choices = Capability("n>1", self.name, known=False)
        self._prefill_gate = asyncio.Lock()
        self._prefill_ok = False
        self._refuses_prefill = False
        self._warned_temperature = False
        self.breakpoints = Breakpoints(cfg)

    async def aclose(self) -> None:
        await self.client.close()

    async def _call(self, body: dict[str, Any]) -> Message:
        """One API call under the retry policy and the concurrency limit, billed as it returns."""
        with tracing.upstream_call(self.cfg.kind, self.cfg.model, 1) as span:
            async for attempt in retrying(self.cfg.max_attempts, self.cfg.backoff_initial_s, self.cfg.backoff_max_s):
                with attempt:
                    async with self._limit:
                        try:
                            message = await self.client.messages.create(**body)
                        except anthropic.APIError as e:
                            raise from_anthropic(e, self.cfg.model) from e
            usage = usage_of(message)
            span.usage(usage)
        self.record(usage)
        return message

    async def _create(self, body: dict[str, Any], prefilled: bool) -> Message:
        """`_call`, except that until a prefill was accepted once, prefilled requests go one at a
        time, and after a model refused prefill they fail without a request."""
        if not prefilled or self._prefill_ok:
            return await self._call(body)
        async with self._prefill_gate:
            if self._refuses_prefill:
                raise PrefillUnsupportedError(self.cfg.model)
            if not self._prefill_ok:
                try:
                    message = await self._call(body)
                except PrefillUnsupportedError:
                    self._refuses_prefill = True
                    raise
                self._prefill_ok = True
                return message
        return await self._call(body)

    def _temperature(self, asked: float) -> float:
        if asked <= MAX_TEMPERATURE:
            return asked
        if not self._warned_temperature:
            self._warned_temperature = True
            log.warning("upstream %s: temperature %.2f is above Anthropic's maximum; sending %.1f",
                        self.name, asked, MAX_TEMPERATURE)
        return MAX_TEMPERATURE

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        sent, held = hold_trailing_whitespace(partial)
        system, messages = to_messages(conversation, sent)
        texts = [system] + [m["content"] if isinstance(m["content"], str) else "".join(b["text"] for b in m["content"])
                            for m in messages]
        max_tokens = self.room(["".join(texts)], params.max_tokens)
        if max_tokens < 1:  # the context window is full: nothing more can be generated
            return self.window_full(params.n)
        writes, twins, written = self.breakpoints.bodies(conversation, system, messages)
        body: dict[str, Any] = dict(model=self.cfg.model, max_tokens=max_tokens, messages=twins)
        if system:
            body["system"] = system
        api_stops = [s for s in params.stop if s.strip()]
        if api_stops:
            body["stop_sequences"] = api_stops
        sampling: dict[str, Any] = {"temperature": self._temperature(params.temperature)}
        if params.top_p < 1.0:
            sampling["top_p"] = params.top_p
        body["extra_body"] = {**sampling, **self.cfg.extra_body}  # this SDK has no sampling kwargs
        prefilled = messages[-1]["role"] == "assistant" if messages else False
        first = [True]

        stagger = self.cfg.stagger_twins

        def create(k: int, seed: int | None) -> Any:
            """The first request of the K writes the prefill (when it is to be written); its
            twins only read: at once, none of them could read what the first writes, so they
            mark nothing new; staggered (`stagger_twins`), they come after it and read it."""
            one, first[0] = {**body, "messages": writes} if first[0] or stagger else body, False
            return self._create(one, prefilled)

        answers = await n_choices(params.n, params.seed, self.n_choices, create, lambda m: 1, lambda e: False,
                                  stagger=stagger)
        if written is not None:
            self.breakpoints.wrote(conversation, written)
        local_stops = [s for s in params.stop if s and not s.strip()]
        conts = [self._continuation(m, held, max_tokens, local_stops) for m in answers]
        return SampleResult(conts, sum((usage_of(m) for m in answers), Usage()), len(answers))

    def _continuation(self, message: Message, held: str, max_tokens: int, local_stops: list[str]) -> Continuation:
        """The chunk that extends the partial answer, from the text blocks only. The billed output
        tokens count reasoning too, so with reasoning blocks the text is counted instead."""
        text = "".join(b.text for b in message.content if b.type == "text")
        reasoned = any(b.type != "text" for b in message.content)
        chunk = join_held(held, text)
        cut = first_stop(chunk, local_stops)
        if cut is not None:
            return Continuation(chunk[:cut], True, count_tokens(chunk[:cut], self.cfg.encoding), "stop")
        reason = message.stop_reason
        if reason in ("end_turn", "stop_sequence", "refusal"):
            used = count_tokens(chunk, self.cfg.encoding) if reasoned else message.usage.output_tokens
            return Continuation(chunk, True, used, "content_filter" if reason == "refusal" else "stop")
        if not chunk:  # e.g. reasoning spent the whole budget: nothing to count, nothing to extend
            return Continuation("", False, 0, "length")
        used = max_tokens if reason == "max_tokens" and not reasoned else count_tokens(chunk, self.cfg.encoding)
        return Continuation(chunk, False, used, "length")

    async def probe(self) -> Probe:
        """GET /v1/models once, without retries; a model it does not list (an alias such as
        `claude-sonnet-4-5`, or one past the first page) is looked up by GET /v1/models/{id}."""
        client = self.client.with_options(timeout=min(5.0, self.cfg.timeout_s), max_retries=0)
        try:
            page = await client.models.list(limit=1000)
            if any(m.id == self.cfg.model for m in page.data):
                return Probe("reachable")
            try:
                await client.models.retrieve(self.cfg.model)
            except anthropic.NotFoundError:
                return Probe("model unknown", f"the upstream does not know {self.cfg.model!r}")
        except anthropic.APIError as e:
            return probe_failure(from_anthropic(e, self.cfg.model))
        return Probe("reachable")
