"""The OpenAI-compatible guidance server: point an existing OpenAI client at it, get guided answers.

Routes: POST /v1/completions, POST /v1/chat/completions, POST /v1/responses, GET /v1/models,
GET /health (alive), GET /health/ready (scorer loaded and upstream reachable), GET /metrics
(Prometheus).
This module holds what is about the server as a whole: its lifecycle, the route table, the
middleware every request passes (auth, errors in OpenAI's shape, request metrics) and the
simple routes. Generation lives in proxy.serving.generation and its endpoint classes.

The upstream and the scorer are the engine's (proxy.engine). The server listens at once and
has the engine load the scorer on a worker thread meanwhile, so /health answers during a long
model load and /health/ready (the engine's `probe`) says when guided requests can be served.
A client that disconnects cancels its handler (`handler_cancellation`), which cancels the
search and its upstream requests.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.web_log import AccessLogger

from proxy import tracing
from proxy.config import AppConfig, server_api_keys
from proxy.engine import Engine
from proxy.logs import REQUEST_ID, request_id_from
from proxy.presets import server_modes
from proxy.protocol.responses import ModelCard, ModelList
from proxy.serving.auth import ApiKeys
from proxy.serving.body import too_large
from proxy.serving.chat import ChatEndpoint
from proxy.serving.completions import CompletionsEndpoint
from proxy.serving.responses_api import ResponsesEndpoint
from proxy.serving.endpoint import Endpoint
from proxy.serving.errors import ApiError, internal_error
from proxy.serving.generation import CALLER_KEY, Generation, json_response
from proxy.serving.guidance import GuidanceModes
from proxy.serving.metrics import FIRST_TOKEN_KEY, MODEL_KEY, ServerMetrics
from proxy.serving.site import listen
from proxy.serving.streaming import STREAM_STATUS
from proxy.upstreams.base import Upstream
from scorers.base import Scorer

log = logging.getLogger("w2s.server")

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = web.RequestKey("w2s_request_id", str)
UNTRACED = frozenset({"/health", "/health/ready", "/metrics"})
"""Routes without a `w2s.request` span: probes and scrapes, many a minute, would bury the requests."""


class GuidanceServer:
    """An HTTP adapter over one Engine (one upstream, maybe one scorer) shared by every request;
    use `async with` or start()/stop()."""

    def __init__(self, config: AppConfig, *, upstream: Upstream | None = None, scorer: Scorer | None = None,
                 engine: Engine | None = None, api_keys: Sequence[str] | None = None, access_log: bool = False,
                 shutdown_timeout_s: float | None = None) -> None:
        """`upstream` / `scorer` injected here are used as they are and not closed by the server;
        otherwise they are built from `config`. An `engine` is shared with its owner, who closes
        it. `api_keys` overrides `server.api_keys_env`, `shutdown_timeout_s` `server.shutdown_grace_s`."""
        if engine is not None and (upstream is not None or scorer is not None):
            raise ValueError("GuidanceServer: pass an engine, or an upstream and/or a scorer, not both")
        self.config = config
        keys = list(api_keys) if api_keys is not None else [k.get_secret_value() for k in server_api_keys(config.server)]
        self._keys = ApiKeys(keys)
        self.engine = engine if engine is not None else Engine(config, upstream=upstream, scorer=scorer)
        self._owns_engine = engine is None
        self.modes = GuidanceModes(config.upstream.model, config.search, server_modes(config.server),
                                   config.server.caps, guided=self.engine.guided)
        self.metrics = ServerMetrics(self.modes.modes, models=self.modes.model_ids())
        self.generation = Generation(config, self.modes, self.metrics, self.engine)
        self._access_log = access_log
        self._shutdown_timeout_s = config.server.shutdown_grace_s if shutdown_timeout_s is None else shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.server.max_body_bytes, middlewares=[self._middleware])
        app.on_response_prepare.append(_stamp_request_id)
        endpoints: list[Endpoint[Any]] = [CompletionsEndpoint(), ChatEndpoint(), ResponsesEndpoint()]
        for endpoint in endpoints:
            app.router.add_post(endpoint.path, self._route(endpoint))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        return app

    def _route(self, endpoint: Endpoint[Any]) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.generation.handle(request, endpoint)
        return handler

    async def start(self, host: str | None = None, port: int | None = None) -> str:
        """Listen (port 0: an ephemeral one), then start loading the scorer (the engine's, on a
        worker thread), and return the base URL (".../v1") without waiting for it."""
        if self._runner is not None:
            raise RuntimeError("server already started")
        host = host or self.config.server.host
        port = self.config.server.port if port is None else port
        self.engine.open()
        # keepalive_timeout also closes a connection still sending its request head at that
        # age (aiohttp counts it idle), which is what bounds slow clients before a handler runs.
        try:
            runner, root = await listen(self.app, host, port, handler_cancellation=True,
                                        shutdown_timeout=self._shutdown_timeout_s,
                                        keepalive_timeout=self.config.server.idle_timeout_s,
                                        auto_decompress=False,  # bodies are decoded by proxy.serving.body
                                        **({"access_log_class": RequestIdAccessLogger} if self._access_log
                                           else {"access_log": None}))
        except BaseException:
            if self._owns_engine:
                await self.engine.aclose()
            raise
        self._runner = runner
        self.base_url = f"{root}/v1"
        self.engine.begin_loading()
        return self.base_url

    async def wait_ready(self) -> None:
        """Return once the scorer is loaded (at once without one); raise if loading failed."""
        await self.engine.wait_ready()

    async def stop(self) -> None:
        """Stop taking requests; let those in flight finish within the grace period
        (`shutdown_timeout_s`). Searches still running near its end are ended, each answering
        `server_shutting_down` (a 503, or a stream's error event), so the server stops within the
        grace period and every request gets an answer. (aiohttp alone would wait the whole period,
        then cancel what is left and wait as long again, cutting those connections unanswered.)"""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            ending = asyncio.create_task(self._end_searches_after(self._shutdown_timeout_s * 0.8))
            try:
                await runner.cleanup()
            finally:
                ending.cancel()
        if self._owns_engine:
            await self.engine.aclose()

    async def _end_searches_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self.generation.end_searches()

    async def __aenter__(self) -> GuidanceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ every request

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The request id, auth on /v1/*, every exception answered in OpenAI's shape, and the
        request metrics. The id (the client's `X-Request-Id` when sane, else ours) goes on every
        response, streams and errors included (`_stamp_request_id`), and on every log line
        written while serving it (proxy.logs.REQUEST_ID, inherited by the tasks it starts). The
        `w2s.request` span (proxy.tracing) continues the caller's trace and is the parent of the
        search's spans; it is current, like the id, until the `finally`."""
        t0 = time.perf_counter()
        request[REQUEST_ID_KEY] = rid = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        rid_token = REQUEST_ID.set(rid)
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "other"
        span = tracing.NO_SPAN if endpoint in UNTRACED else tracing.start_request(
            request.headers, **{"http.request.method": request.method, "http.route": endpoint, "w2s.request_id": rid})
        status = 500
        try:
            if request.path.startswith("/v1/"):
                request[CALLER_KEY] = self._keys.check(request)
            response = await handler(request)
            status = request.get(STREAM_STATUS, response.status)
            return response
        except ApiError as e:
            status = e.status
            return e.response()
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return too_large(self.config.server.max_body_bytes).response()
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
        except Exception as e:
            log.exception("unhandled error in %s %s", request.method, request.path)
            span.fail(e)
            return internal_error().response()
        finally:
            model = request.get(MODEL_KEY)
            first = request.get(FIRST_TOKEN_KEY)
            if first is not None and status == 200:
                self.metrics.first_token(model, first - t0)
            self.metrics.request_done(endpoint, status, time.perf_counter() - t0, model)
            span.set(**{"gen_ai.request.model": model})
            span.done(status)
            REQUEST_ID.reset(rid_token)

    # ------------------------------------------------------------------ simple routes

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _ready(self, request: web.Request) -> web.Response:
        r = await self.engine.probe()
        return web.json_response({"status": "ready" if r.ready else "not ready", "scorer": r.scorer,
                                  "upstream": r.upstream}, status=200 if r.ready else 503)

    async def _models(self, request: web.Request) -> web.Response:
        return json_response(ModelList(data=[ModelCard(id=m) for m in self.modes.model_ids()]))

    async def _model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: the openai SDK's `models.retrieve` (ids may contain slashes)."""
        wanted = request.match_info["model"]
        if wanted not in self.modes.model_ids():
            raise ApiError(404, f"The model `{wanted}` does not exist.", param="model", code="model_not_found")
        return json_response(ModelCard(id=wanted))

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the request's id on its response, as its headers go out."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid


class RequestIdAccessLogger(AccessLogger):
    """aiohttp's access log (`w2s serve -v`), each line with its request's id: aiohttp writes it
    after the middleware has returned, outside the request's context."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        token = REQUEST_ID.set(request.get(REQUEST_ID_KEY))
        try:
            super().log(request, response, time)
        finally:
            REQUEST_ID.reset(token)
