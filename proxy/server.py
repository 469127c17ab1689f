"""The OpenAI-compatible guidance server: point an existing OpenAI client at it, get guided answers.

    w2s serve --config configs/paper-cbs-w4k4l30.yaml

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (alive),
GET /health/ready (scorer loaded and upstream reachable), GET /metrics (Prometheus text).
The model name picks the guidance (`gpt-3.5-turbo-instruct` plain, `...+cbs-w4k4l30` guided;
see proxy.guidance); wire models live in proxy.api_models. This module only serves: it
parses, checks auth and limits, runs `proxy.search.search`, and writes the answer, whole or
as server-sent events of the settled common prefix (proxy.streaming).

The server listens at once and loads the scorer on a worker thread meanwhile, so /health
answers during a long model load and /health/ready says when guided requests can be served.
A client that disconnects cancels its handler (`handler_cancellation`), which cancels the
search and its upstream requests.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import openai
from aiohttp import web
from pydantic import BaseModel, ValidationError

from proxy.api_models import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SearchSummary,
    UsageInfo,
    SamplingRequest,
    new_id,
    now,
)
from proxy.config import AppConfig, ConfigError, load_config, server_api_keys
from proxy.cost import cost_usd
from proxy.guidance import GuidanceError, GuidanceModes, Plan
from proxy.metrics import CONTENT_TYPE, ServerMetrics
from proxy.prompts import render_chat
from proxy.search import Candidate, SearchResult, StepCallback, StepTrace, search
from proxy.streaming import SettledText, common_prefix
from proxy.upstreams.base import Upstream
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from proxy.upstreams.registry import make_upstream
from scorers.base import ChatMessage, Scorer, ScorerPrompt

log = logging.getLogger("w2s.server")
_Req = TypeVar("_Req", bound=BaseModel)
# Status of a stream that failed after its 200 went out, for the request metrics.
_STREAM_STATUS = web.RequestKey("w2s_stream_status", int)

_ERROR_TYPES = {429: "rate_limit_error", 502: "upstream_error", 504: "upstream_error"}
# Pydantic names the member of a union that failed (`prompt.str`); the client only knows fields.
_UNION_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


class ApiError(Exception):
    """Answered as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers
        self.body = ErrorResponse(error=ErrorInfo(
            message=message, param=param, code=code,
            type=type_ or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")))

    def response(self) -> web.Response:
        return web.Response(text=self.body.model_dump_json(), status=self.status,
                            content_type="application/json", headers=self.headers)


def _param(loc: Sequence[int | str]) -> str | None:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    return ".".join(parts) or None


def validation_error(err: ValidationError) -> ApiError:
    """One 400 naming the first bad field, with every complaint about that field."""
    errors = err.errors()
    if errors[0]["type"] == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request.", code="invalid_json")
    param = _param(errors[0]["loc"])
    msgs: list[str] = []
    for e in errors:
        if _param(e["loc"]) == param:
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            if msg not in msgs:
                msgs.append(msg)
    if param is None:
        return ApiError(400, f"The request body must be a JSON object ({'; '.join(msgs)}).")
    return ApiError(400, f"{param}: {' or '.join(msgs)}", param=param, code="invalid_value")


def _json(model: BaseModel) -> web.Response:
    return web.Response(text=model.model_dump_json(), content_type="application/json")


def _sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison constant-time in the key's length too.
    return hashlib.sha256(key.encode()).digest()


class GuidanceServer:
    """One upstream and one scorer shared by every request; use `async with` or start()/stop()."""

    def __init__(self, config: AppConfig, *, upstream: Upstream | None = None, scorer: Scorer | None = None,
                 api_keys: Sequence[str] | None = None, access_log: bool = False,
                 shutdown_timeout_s: float = 10.0) -> None:
        """`upstream` / `scorer` injected here are used as they are and not closed by the server;
        otherwise they are built from `config`. `api_keys` overrides `server.api_keys_env`."""
        self.config = config
        keys = list(api_keys) if api_keys is not None else [k.get_secret_value() for k in server_api_keys(config.server)]
        self._key_digests = [_digest(k) for k in keys]
        self._upstream = upstream
        self._owns_upstream = upstream is None
        self._scorer = scorer
        self._owns_scorer = scorer is None
        guided = scorer is not None or config.scorer is not None
        self.scorer_state = "loaded" if scorer is not None else "loading" if config.scorer is not None else "none"
        self.modes = GuidanceModes(config.upstream.model, config.search, dict(config.server.modes),
                                   config.server.caps, guided=guided)
        self.metrics = ServerMetrics()
        self._access_log = access_log
        self._shutdown_timeout_s = shutdown_timeout_s
        self._active = 0
        self._runner: web.AppRunner | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.base_url = ""
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.server.max_body_bytes, middlewares=[self._middleware])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        return app

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            raise RuntimeError("server not started")
        return self._upstream

    async def start(self, host: str | None = None, port: int | None = None) -> str:
        """Listen (port 0: an ephemeral one), start loading the scorer, return the base URL (".../v1")."""
        if self._runner is not None:
            raise RuntimeError("server already started")
        host = host or self.config.server.host
        port = self.config.server.port if port is None else port
        if self._upstream is None:
            self._upstream = make_upstream(self.config.upstream)
        runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=self._shutdown_timeout_s,
                               **({} if self._access_log else {"access_log": None}))
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            if self._owns_upstream:
                await self._upstream.aclose()
                self._upstream = None
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}/v1"
        if self.scorer_state == "loading":
            self._load_task = asyncio.create_task(self._load_scorer())
        return self.base_url

    async def _load_scorer(self) -> None:
        from scorers.registry import load_scorer  # imports torch: only when a scorer is configured

        assert self.config.scorer is not None
        try:
            self._scorer = await asyncio.to_thread(load_scorer, self.config.scorer)
            self.scorer_state = "loaded"
            log.info("scorer loaded")
        except Exception as e:  # noqa: BLE001 - reported by /health/ready and every guided request
            self.scorer_state = f"failed: {type(e).__name__}: {e}"
            log.error("scorer failed to load: %s", self.scorer_state)

    async def wait_ready(self) -> None:
        """Return once the scorer is loaded (at once without one); raise if loading failed."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        if self.scorer_state.startswith("failed"):
            raise RuntimeError(f"scorer {self.scorer_state}")

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._owns_upstream and self._upstream is not None:
            await self._upstream.aclose()
            self._upstream = None
        if self._owns_scorer and self._scorer is not None:
            await self._scorer.aclose()
            self._scorer = None

    async def __aenter__(self) -> "GuidanceServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ cross-cutting

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        t0 = time.perf_counter()
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "other"
        status = 500
        try:
            if request.path.startswith("/v1/"):
                self._authorize(request)
            response = await handler(request)
            status = request.get(_STREAM_STATUS, response.status)
            return response
        except ApiError as e:
            status = e.status
            return e.response()
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return self._too_large().response()
        except web.HTTPException as e:  # unknown route, wrong method
            status = e.status
            return ApiError(e.status, f"{request.method} {request.path}: {e.reason}", code="not_found"
                            if e.status == 404 else None).response()
        except asyncio.CancelledError:
            status = 499  # client closed the connection (nginx's convention)
            raise
        except ConnectionResetError:  # a write found the client gone before the cancellation did
            status = 499
            return web.Response(status=499)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return ApiError(500, "internal server error").response()
        finally:
            self.metrics.requests.inc(endpoint=endpoint, status=str(status))
            self.metrics.request_seconds.observe(time.perf_counter() - t0, endpoint=endpoint)

    def _authorize(self, request: web.Request) -> None:
        if not self._key_digests:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        ok = False
        if scheme.lower() == "bearer" and given:
            digest = _digest(given.strip())
            for d in self._key_digests:  # no early exit: the time does not tell which key matched
                ok |= hmac.compare_digest(digest, d)
        if not ok:
            raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    def _too_large(self) -> ApiError:
        return ApiError(413, f"The request body exceeds {self.config.server.max_body_bytes} bytes.",
                        code="request_too_large")

    async def _parse(self, request: web.Request, model: type[_Req]) -> _Req:
        if request.content_length is not None and request.content_length > self.config.server.max_body_bytes:
            raise self._too_large()
        raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise validation_error(e) from None

    # ------------------------------------------------------------------ simple routes

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _ready(self, request: web.Request) -> web.Response:
        upstream_ok, upstream_state = await self._probe_upstream()
        scorer_ok = self.scorer_state in ("loaded", "none")
        ready = upstream_ok and scorer_ok
        return web.json_response({"status": "ready" if ready else "not ready", "scorer": self.scorer_state,
                                  "upstream": upstream_state}, status=200 if ready else 503)

    async def _probe_upstream(self) -> tuple[bool, str]:
        """GET the upstream's /models, without retries: reachability now, not eventually."""
        up = self._upstream
        if not isinstance(up, OpenAICompletionsUpstream):
            return up is not None, "in-process" if up is not None else "not started"
        try:
            await up.client.with_options(timeout=min(5.0, up.cfg.timeout_s), max_retries=0).models.list()
        except openai.APIStatusError as e:
            return False, f"refused: HTTP {e.status_code}"
        except openai.APIConnectionError as e:
            return False, f"unreachable: {type(e).__name__}"
        return True, "reachable"

    async def _models(self, request: web.Request) -> web.Response:
        return _json(ModelList(data=[ModelCard(id=m) for m in self.modes.model_ids()]))

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    # ------------------------------------------------------------------ generation

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(request, CompletionRequest)
        plan = self._plan(req, req.max_tokens)
        return await self._generate(request, req, plan, req.prompt_text, req.prompt_text, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(request, ChatCompletionRequest)
        plan = self._plan(req, req.token_limit)
        messages: list[ChatMessage] = [m.as_message() for m in req.messages]  # type: ignore[misc]
        try:
            prompt = render_chat(messages, self.config.upstream)
        except ConfigError as e:
            field, _, _ = str(e).partition(":")
            raise ApiError(400, str(e), param=field, code="invalid_value") from None
        return await self._generate(request, req, plan, prompt, messages, chat=True)

    def _plan(self, req: SamplingRequest, max_tokens: int | None) -> Plan:
        try:
            return self.modes.resolve(req.model, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                      seed=req.seed, stop=req.stop_list,
                                      w2s=req.w2s.model_dump(include=req.w2s.model_fields_set) if req.w2s else None)
        except GuidanceError as e:
            raise ApiError(e.status, e.message, param=e.param, code=e.code) from None

    def _scorer_for(self, plan: Plan) -> Scorer | None:
        if not plan.search.needs_scorer:
            return None
        if self._scorer is None:
            state = "still loading" if self.scorer_state == "loading" else self.scorer_state
            raise ApiError(503, f"guided modes are unavailable: the scorer is {state}", code="scorer_unavailable",
                           headers={"Retry-After": "5"} if self.scorer_state == "loading" else None)
        return self._scorer

    async def _generate(self, request: web.Request, req: SamplingRequest, plan: Plan, prompt: str,
                        scorer_prompt: ScorerPrompt, *, chat: bool) -> web.StreamResponse:
        scorer = self._scorer_for(plan)
        if self._active >= self.config.server.max_concurrent_requests:
            raise ApiError(429, f"The server is serving its limit of {self.config.server.max_concurrent_requests} "
                           "requests; retry shortly.", code="concurrency_limit", headers={"Retry-After": "1"})
        self._active += 1
        self.metrics.in_flight.inc()
        try:
            if req.stream:
                return await self._stream(request, req, plan, prompt, scorer, scorer_prompt, chat=chat)
            result = await self._search(plan, prompt, scorer, scorer_prompt, self._observe)
            return _json(self._answer(req.model, plan, result, chat))
        finally:
            self._active -= 1
            self.metrics.in_flight.dec()

    def _observe(self, trace: StepTrace, survivors: list[Candidate]) -> None:
        self.metrics.observe_step(trace, cost_usd(trace.usage, self.config.upstream.prices))

    async def _search(self, plan: Plan, prompt: str, scorer: Scorer | None, scorer_prompt: ScorerPrompt,
                      on_step: StepCallback) -> SearchResult:
        """The search, with upstream failures (after the retry policy gave up) as 502 / 504."""
        outcome = "error"
        try:
            result = await search(prompt, self.upstream, scorer, plan.search, scorer_prompt=scorer_prompt,
                                  on_step=on_step)
            outcome = "finished" if result.finished else "length"
            return result
        except (asyncio.CancelledError, ConnectionResetError):  # the client went away
            outcome = "cancelled"
            raise
        except openai.APITimeoutError:
            raise ApiError(504, "The upstream did not answer in time (after retries).",
                           code="upstream_timeout") from None
        except openai.APIStatusError as e:
            # The upstream's own message is not passed on: some echo (part of) the key they got.
            log.warning("upstream failed with HTTP %s after retries", e.status_code)
            raise ApiError(502, f"The upstream failed with HTTP {e.status_code} (after retries).",
                           code="upstream_error") from None
        except openai.APIConnectionError:
            raise ApiError(502, "The upstream could not be reached (after retries).", code="upstream_error") from None
        except openai.APIResponseValidationError:
            raise ApiError(502, "The upstream answered with a malformed completion.", code="upstream_error") from None
        finally:
            self.metrics.searches.inc(outcome=outcome)

    def _summary(self, plan: Plan, r: SearchResult) -> SearchSummary:
        return SearchSummary(mode=plan.mode, steps=len(r.steps), upstream_calls=r.calls, score=r.score,
                             finished=r.finished, tokens=r.tokens,
                             cost_usd=cost_usd(r.usage, self.config.upstream.prices), wall_s=round(r.wall_s, 4))

    @staticmethod
    def _usage(r: SearchResult) -> UsageInfo:
        return UsageInfo(prompt_tokens=r.usage.prompt_tokens, completion_tokens=r.usage.completion_tokens,
                         total_tokens=r.usage.total_tokens)

    def _answer(self, model: str, plan: Plan, r: SearchResult, chat: bool) -> BaseModel:
        reason = "stop" if r.finished else "length"
        if chat:
            return ChatCompletionResponse(
                model=model, usage=self._usage(r), w2s=self._summary(plan, r),
                choices=[ChatChoice(message=ChatMessageOut(content=r.text.lstrip()), finish_reason=reason)])
        return CompletionResponse(model=model, usage=self._usage(r), w2s=self._summary(plan, r),
                                  choices=[CompletionChoice(text=r.text, finish_reason=reason)])

    async def _stream(self, request: web.Request, req: SamplingRequest, plan: Plan, prompt: str,
                      scorer: Scorer | None, scorer_prompt: ScorerPrompt, *, chat: bool) -> web.StreamResponse:
        """SSE: text as soon as every surviving beam agrees on it, the rest at the end, then [DONE]."""
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()

        def chunk(text: str | None = None, reason: str | None = None, *, role: bool = False,
                  summary: SearchSummary | None = None, usage: UsageInfo | None = None,
                  empty: bool = False) -> BaseModel:
            if chat:
                choices = [] if empty else [ChatChunkChoice(
                    delta=ChatDelta(role="assistant" if role else None, content=text), finish_reason=reason)]
                return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices,
                                           usage=usage, w2s=summary)
            choices_c = [] if empty else [CompletionChoice(text=text or "", finish_reason=reason)]  # type: ignore[arg-type]
            return CompletionResponse(id=rid, created=created, model=req.model, choices=choices_c,
                                      usage=usage, w2s=summary)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        settled = SettledText(str.lstrip if chat else (lambda s: s))
        if chat:
            await response.write(_sse(chunk("", role=True)))

        async def on_step(trace: StepTrace, survivors: list[Candidate]) -> None:
            self._observe(trace, survivors)
            delta = settled.advance(common_prefix([s.text for s in survivors]))
            if delta:
                await response.write(_sse(chunk(delta)))

        try:
            result = await self._search(plan, prompt, scorer, scorer_prompt, on_step)
        except ConnectionResetError:
            raise
        except Exception as e:  # the status line is gone: report in-band, as OpenAI does
            if not isinstance(e, ApiError):
                log.exception("unhandled error in a streamed search")
            error = e if isinstance(e, ApiError) else ApiError(500, "internal server error")
            request[_STREAM_STATUS] = error.status
            await response.write(b"data: " + error.body.model_dump_json().encode() + b"\n\n")
            await response.write_eof()
            return response
        rest = settled.advance(result.text)
        if rest:
            await response.write(_sse(chunk(rest)))
        await response.write(_sse(chunk(None if chat else "", "stop" if result.finished else "length",
                                        summary=self._summary(plan, result))))
        if req.include_usage:
            await response.write(_sse(chunk(usage=self._usage(result), empty=True)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# ---------------------------------------------------------------------- `w2s serve`


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="OpenAI-compatible server: guided answers for any OpenAI client")
    p.add_argument("--config", required=True, help="config file or preset name under configs/")
    p.add_argument("--host", help="default: server.host (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: server.port (8000); 0 picks a free port")
    p.set_defaults(func=serve)


def freeze_heap() -> None:
    """Exempt everything alive now (modules, schemas, model objects) from the cyclic GC.

    A full collection walks every tracked object, and with openai's types and torch loaded a
    walk stalls the event loop for tens to hundreds of milliseconds; objects made at startup
    live for the whole process anyway. Only the process owner (`w2s serve`) may do this.
    """
    gc.collect()
    gc.freeze()


async def serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    server = GuidanceServer(cfg, access_log=bool(getattr(args, "verbose", False)))
    await server.start(args.host, args.port)
    freeze_heap()
    loaded: asyncio.Task[None] | None = None
    try:
        print(f"w2s: serving {server.base_url}  models: {', '.join(server.modes.model_ids())}", flush=True)
        if server.scorer_state == "loading":
            print("w2s: loading the scorer; GET /health/ready says when guided modes are available", flush=True)

            async def freeze_when_loaded() -> None:
                with contextlib.suppress(RuntimeError):
                    await server.wait_ready()
                freeze_heap()

            loaded = asyncio.create_task(freeze_when_loaded())
        await asyncio.Event().wait()
    finally:
        if loaded is not None:
            loaded.cancel()
        await server.stop()
    return 0
