"""The core every generation route shares: parse, plan, admit, search, answer.

A route (proxy.serving.completions, proxy.serving.chat) only says how its request becomes a
prompt and how its responses look; this module does the rest the same way for each: the body
parsed strictly within the size limit, the model alias and fields resolved to a search
(proxy.serving.guidance), the scorer and concurrency checks, the search with its metrics and
its upstream failures translated (proxy.serving.errors), and the answer whole or streamed
(proxy.serving.streaming).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from proxy.budget import Budget, admit
from proxy.config import AppConfig, upstream_api_key
from proxy.cost import cost_usd
from proxy.engine import Engine, ResultSummary, ScorerUnavailable
from proxy.protocol.requests import CHAT_REFUSED, SamplingRequest, W2SOptions, upstream_features
from proxy.protocol.responses import SearchSummary
from proxy.search import Candidate, SearchPlan, SearchResult, StepCallback, StepTrace, StoppedBy
from proxy.serving.body import read_body
from proxy.serving.endpoint import Endpoint, finish_reason, usage_info
from proxy.serving.errors import ApiError, shutting_down, upstream_error, validation_error
from proxy.search.plan import SettingTooSmall
from proxy.serving.guidance import REQUEST_FIELD, GuidanceError, GuidanceModes, ModeChoice
from proxy.serving.metrics import MODEL_KEY, ServerMetrics
from proxy.serving.passthrough import Passthrough, chat_upstream
from proxy.serving.streaming import StepHook, stream_search
from proxy.types import Conversation, Usage
from proxy.upstreams.errors import UpstreamError
from proxy.upstreams.retry import retries_reported_to
from scorers.base import ScorerContextError, ScorerFailure

_Req = TypeVar("_Req", bound=BaseModel)
Outcome = Literal["finished", "length", "cancelled", "error"]
"""How a search ended, as the metrics count it."""
log = logging.getLogger("w2s.server")


def json_response(model: BaseModel) -> web.Response:
    return web.Response(text=model.model_dump_json(), content_type="application/json")


async def parse_body(request: web.Request, model: type[_Req], max_bytes: int, timeout_s: float) -> _Req:
    """The body as `model`, or a 400 naming the bad field (the body's own refusals: body.read_body)."""
    return validated(await read_body(request, max_bytes, timeout_s), model)


def validated(raw: bytes, model: type[_Req]) -> _Req:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None


def sent_options(w2s: BaseModel | None) -> dict[str, Any] | None:
    """The `w2s` fields the client sent, for `GuidanceModes.resolve` (an explicit null kept)."""
    return w2s.model_dump(include=w2s.model_fields_set) if w2s is not None else None


CALLER_KEY = web.RequestKey("w2s_caller_key", object)
"""Which proxy key a request came with (its index; None without keys): whose budget it spends."""


def nothing_answered(stopped_by: StoppedBy) -> ApiError:
    """A search stopped before its first step ended has no answer: an error, never a 200 with an
    empty text a client would take for one."""
    if stopped_by == "deadline":
        return ApiError(504, "The search's deadline (w2s.deadline_s) passed before its first step finished; "
                        "nothing was answered.", code="deadline_exceeded")
    if stopped_by == "shared budget":
        return ApiError(429, "This API key's upstream budget cannot pay for this search's first step.",
                        code="insufficient_quota", type_="insufficient_quota")
    return ApiError(400, "The search's own cap cannot pay for its first step; nothing was answered.",
                    code="invalid_value")


def wire_summary(summary: ResultSummary) -> SearchSummary:
    """The engine's summary as the `w2s` field of a response."""
    return SearchSummary(**{name: getattr(summary, name) for name in SearchSummary.model_fields})


class Generation:
    """Serves generation routes through the server's engine (one upstream and maybe one scorer,
    shared by all requests)."""

    def __init__(self, config: AppConfig, modes: GuidanceModes, metrics: ServerMetrics, engine: Engine) -> None:
        self.config = config
        self.modes = modes
        self.metrics = metrics
        self.engine = engine
        self.active = 0
        self._key_budgets: dict[object, Budget] = {}
        self._searches: set[asyncio.Task[SearchResult]] = set()
        self._ending = False
        self._passthrough: Passthrough | None = None

    def end_searches(self) -> None:
        """End every search being served, streamed or not, and refuse any begun from now on: each
        answers `server_shutting_down` (a 503, or a stream's error event), so that none is left
        for aiohttp to cut without an answer when the server's shutdown grace period is over.
        The server calls this when its grace period is running out (GuidanceServer.stop)."""
        self._ending = True
        for task in list(self._searches):
            task.cancel()

    async def _endable(self, search: Callable[[], Coroutine[Any, Any, SearchResult]]) -> SearchResult:
        """`search()` as a task `end_searches` can end, its ending raised as `server_shutting_down`.
        The client going away cancels this handler, and so the search it awaits."""
        if self._ending:
            raise shutting_down()
        task = asyncio.create_task(search())
        self._searches.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # the client went away
                raise
            raise shutting_down() from None  # the server ended the search
        finally:
            self._searches.discard(task)

    async def handle(self, request: web.Request, endpoint: Endpoint[Any]) -> web.StreamResponse:
        limits = self.config.server
        raw = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
        forwarded = self._forwarded(raw) if endpoint.forwards else None
        if forwarded is not None:
            passthrough, body = forwarded
            request[MODEL_KEY] = body["model"]
            async with self._admitted(request, Usage(0, 1)) as budget:
                return await passthrough.handle(request, body, budget)
        req: SamplingRequest = validated(raw, endpoint.request_type)
        request[MODEL_KEY] = req.model  # the metrics' `model` label
        try:
            plan = self._plan(req, endpoint.max_tokens(req))
            search = await self._check(plan, endpoint.conversation(req), endpoint)
        except ApiError as e:
            raise endpoint.renamed(e) from None
        async with self._admitted(request, search.first_step_bound) as budget:
            async def searched(hook: StepHook | None) -> SearchResult:
                try:
                    return await self._search(plan.mode, search, budget, hook)
                except ApiError as e:
                    raise endpoint.renamed(e) from None

            def run(hook: StepHook | None) -> Awaitable[SearchResult]:
                return self._endable(lambda: searched(hook))

            def summarize(result: SearchResult) -> SearchSummary:
                return wire_summary(self.engine.summarize(result, plan.mode))

            if req.stream:
                return await stream_search(request, endpoint, req, run, summarize, limits.stream_keepalive_s,
                                           settles=search.algorithm.shared_prefix_is_final)
            result = await run(None)
            return json_response(endpoint.answer(req, result.text, finish_reason(result), usage_info(result),
                                                 summarize(result)))

    @contextlib.asynccontextmanager
    async def _admitted(self, request: web.Request, first_step: Usage) -> AsyncIterator[Budget | None]:
        """Within the concurrency limit and the caller's key budget, or a 429; yields that budget.
        Refused when the key cannot pay for even the first step's samples; checked and held at
        once (nothing awaited in between), so concurrent requests cannot all get in on one key's
        last few tokens. The first step takes the hold over (proxy.budget)."""
        limits = self.config.server
        budget = self._key_budget(request.get(CALLER_KEY))
        admitted = None if budget is None else admit(budget, first_step)
        if budget is not None and admitted is None:
            raise ApiError(429, "This API key has spent its upstream budget (server.key_budget_usd / "
                           "key_budget_tokens) on this server.", code="insufficient_quota", type_="insufficient_quota")
        if self.active >= limits.max_concurrent_requests:
            if admitted is not None:
                admitted.release()
            raise ApiError(429, f"The server is serving its limit of {limits.max_concurrent_requests} "
                           "requests; retry shortly.", code="concurrency_limit", headers={"Retry-After": "1"})
        self.active += 1
        self.metrics.in_flight.inc()
        try:
            yield budget
        finally:
            if admitted is not None:  # never reached a step (failed, cancelled, or nothing to do)
                admitted.release()
            self.active -= 1
            self.metrics.in_flight.dec()

    def _forwarded(self, raw: bytes) -> tuple[Passthrough, dict[str, Any]] | None:
        """Where a plain-mode chat body uses what only the upstream can honour (tools, a response
        format, ...): the passthrough and the body to forward. None where the search serves it,
        or refuses it naming the field (a guided mode); a 400 saying why where plain mode cannot
        forward it (another upstream family, or `server.passthrough` off)."""
        constants: list[str] = []  # NaN and Infinity: Python's json reads them, no upstream does
        try:
            body = json.loads(raw, parse_constant=lambda name: constants.append(name) or float(name))
        except (ValueError, RecursionError):  # not JSON, or nested past what json can hold:
            return None  # the strict parse answers it with a 400
        features = upstream_features(body)
        if not features or not isinstance(body.get("model"), str):
            return None
        try:  # the fields as the strict parse reads them, or that parse names the problem
            w2s = W2SOptions.model_validate(body["w2s"]) if body.get("w2s") is not None else None
            plain = self.modes.resolve(body["model"], w2s=sent_options(w2s)).mode == "base"
        except (ValidationError, GuidanceError):
            return None  # the strict parse and the plan name the problem
        if not plain:
            return None
        if constants:
            raise ApiError(400, f"We could not forward the JSON body of your request: {constants[0]} is not a JSON "
                           "value (RFC 8259), and the upstream reads JSON.", code="invalid_json")
        self._within_caps(body)
        passthrough = self._passthrough_now()
        if passthrough is None:
            name = features[0]
            refusal = CHAT_REFUSED.get(name)
            why = ("server.passthrough is off" if not self.config.server.passthrough else
                   f"this server's upstream ({self.config.upstream.kind}) is not a chat API")
            raise ApiError(400, f"{name}: {refusal.why if refusal else 'only the upstream can honour it'}; plain "
                           f"mode forwards it to a chat upstream as it is, but {why}", param=name, code="invalid_value")
        return passthrough, body

    def _within_caps(self, body: dict[str, Any]) -> None:
        """A forwarded request orders no more than a search may: its token limit within
        `caps.max_tokens`, its choices within `caps.max_w_times_k` (the samples a step may draw)."""
        caps = self.config.server.caps
        for name, cap, what in (("max_tokens", caps.max_tokens, "max_tokens"),
                                ("max_completion_tokens", caps.max_tokens, "max_tokens"),
                                ("n", caps.max_w_times_k, "max_w_times_k")):
            value = body.get(name)
            if isinstance(value, int) and value > cap:
                raise ApiError(400, f"{name} = {value} exceeds this server's cap of {cap} (server.caps.{what})",
                               param=name, code="invalid_value")

    def _passthrough_now(self) -> Passthrough | None:
        if self._passthrough is None and self.config.server.passthrough:
            upstream = chat_upstream(self.engine.upstream)
            if upstream is not None:
                self._passthrough = Passthrough(upstream, self.metrics, self.config.upstream.prices,
                                                [upstream_api_key(upstream.cfg).get_secret_value()])
        return self._passthrough

    async def _check(self, plan: ModeChoice, conversation: Conversation, endpoint: Endpoint[Any]) -> SearchPlan:
        """The checked search: a 503 while the scorer a guided plan needs is loading, or after it
        failed; a 400 naming the field when the prompt or max_tokens cannot fit the scorer's
        context. Before any upstream call, and before a stream's 200."""
        try:
            return await self.engine.plan(conversation, plan.search, score_plain=False)
        except ScorerUnavailable as e:
            raise ApiError(503, f"guided modes are unavailable: {e}", code="scorer_unavailable",
                           headers={"Retry-After": "5"} if e.loading else None) from None
        except ScorerContextError as e:
            param = endpoint.prompt_field if e.field == "prompt" else "max_tokens"
            raise ApiError(400, f"{param}: {e}", param=param, code="context_length_exceeded") from None
        except SettingTooSmall as e:
            param = REQUEST_FIELD[e.setting]
            raise ApiError(400, f"{param}: {e.detail}", param=param, code="invalid_value") from None

    def _plan(self, req: SamplingRequest, max_tokens: int | None) -> ModeChoice:
        try:
            return self.modes.resolve(req.model, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                      seed=req.seed, stop=req.stop_list,
                                      w2s=sent_options(req.w2s))
        except GuidanceError as e:
            raise ApiError(e.status, e.message, param=e.param, code=e.code) from None

    def _key_budget(self, key: object) -> Budget | None:
        """The budget of the key a request came with (all requests share one without keys); in
        this process's memory: replicas each hold their own."""
        server = self.config.server
        if server.key_budget_usd is None and server.key_budget_tokens is None:
            return None
        if key not in self._key_budgets:
            self._key_budgets[key] = Budget(server.key_budget_tokens, server.key_budget_usd,
                                            self.config.upstream.prices)
        return self._key_budgets[key]

    async def _search(self, mode: str, search: SearchPlan, budget: Budget | None,
                      hook: StepHook | None) -> SearchResult:
        """The search, counted in the metrics step by step (so a cancelled or failed search counts
        what it spent), its retries too; upstream failures after retries raised as 502 / 504."""
        prices = self.config.upstream.prices

        def observe(trace: StepTrace, survivors: list[Candidate]) -> None:
            self.metrics.observe_step(trace, cost_usd(trace.usage, prices), mode)

        async def observe_then_hook(trace: StepTrace, survivors: list[Candidate]) -> None:
            observe(trace, survivors)
            await hook(trace, survivors)  # type: ignore[misc]

        on_step: StepCallback = observe if hook is None else observe_then_hook
        outcome: Outcome = "error"
        try:
            with retries_reported_to(self.metrics.upstream_retried):
                result = await self.engine.run(search, on_step=on_step, budget=budget)
            outcome = "finished" if result.finished else "length"
            if not result.steps and result.stopped_by is not None:  # cut before anything was answered
                outcome = "error"
                raise nothing_answered(result.stopped_by)
            return result
        except (asyncio.CancelledError, ConnectionResetError):  # the client went away
            outcome = "cancelled"
            raise
        except UpstreamError as e:
            error = upstream_error(e)
            if error is None:
                raise
            self.metrics.upstream_failed(e)
            raise error from None
        except ScorerContextError as e:  # a check missed it (scorers.room clips responses): still the client's 400
            raise ApiError(400, f"{e}", param="max_tokens" if e.field == "max_tokens" else None,
                           code="context_length_exceeded") from None
        except ScorerFailure as e:
            log.warning("search failed: %s", e)
            raise ApiError(502, f"Guidance scoring failed: {e}.", code="scorer_error") from None
        finally:
            self.metrics.search_done(mode, outcome)
