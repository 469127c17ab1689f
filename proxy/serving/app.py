"""The OpenAI-compatible guidance server: point an existing OpenAI client at it, get guided answers.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (alive),
GET /health/ready (scorer loaded and upstream reachable), GET /metrics (Prometheus).
This module holds what is about the server as a whole: its lifecycle, the route table, the
middleware every request passes (auth, errors in OpenAI's shape, request metrics) and the
simple routes. Generation lives in proxy.serving.generation and its endpoint classes.

The server listens at once and loads the scorer on a worker thread meanwhile, so /health
answers during a long model load and /health/ready says when guided requests can be served.
A client that disconnects cancels its handler (`handler_cancellation`), which cancels the
search and its upstream requests.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import openai
from aiohttp import web

from proxy.config import AppConfig, server_api_keys
from proxy.presets import server_modes
from proxy.serving.auth import ApiKeys
from proxy.serving.chat import ChatEndpoint
from proxy.serving.completions import CompletionsEndpoint
from proxy.serving.endpoint import Endpoint
from proxy.serving.errors import ApiError, internal_error
from proxy.serving.generation import Generation, json_response, too_large
from proxy.serving.guidance import GuidanceModes, Plan
from proxy.serving.metrics import ServerMetrics
from proxy.serving.protocol import ModelCard, ModelList
from proxy.serving.streaming import STREAM_STATUS
from proxy.upstreams.base import Upstream
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from proxy.upstreams.registry import make_upstream
from scorers.base import Scorer

log = logging.getLogger("w2s.server")


class GuidanceServer:
    """One upstream and one scorer shared by every request; use `async with` or start()/stop()."""

    def __init__(self, config: AppConfig, *, upstream: Upstream | None = None, scorer: Scorer | None = None,
                 api_keys: Sequence[str] | None = None, access_log: bool = False,
                 shutdown_timeout_s: float = 10.0) -> None:
        """`upstream` / `scorer` injected here are used as they are and not closed by the server;
        otherwise they are built from `config`. `api_keys` overrides `server.api_keys_env`."""
        self.config = config
        keys = list(api_keys) if api_keys is not None else [k.get_secret_value() for k in server_api_keys(config.server)]
        self._keys = ApiKeys(keys)
        self._upstream = upstream
        self._owns_upstream = upstream is None
        self._scorer = scorer
        self._owns_scorer = scorer is None
        guided = scorer is not None or config.scorer is not None
        self.scorer_state = "loaded" if scorer is not None else "loading" if config.scorer is not None else "none"
        self.modes = GuidanceModes(config.upstream.model, config.search, server_modes(config.server),
                                   config.server.caps, guided=guided)
        self.metrics = ServerMetrics(self.modes.modes)
        self.generation = Generation(config, self.modes, self.metrics, lambda: self.upstream, self._scorer_for)
        self._access_log = access_log
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.base_url = ""
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.server.max_body_bytes, middlewares=[self._middleware])
        endpoints: list[Endpoint[Any]] = [CompletionsEndpoint(), ChatEndpoint(self.config.upstream)]
        for endpoint in endpoints:
            app.router.add_post(endpoint.path, self._route(endpoint))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        return app

    def _route(self, endpoint: Endpoint[Any]) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.generation.handle(request, endpoint)
        return handler

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

    def _scorer_for(self, plan: Plan) -> Scorer | None:
        """The scorer a plan needs (None for plain sampling), or a 503 while it loads or after it failed."""
        if not plan.search.needs_scorer:
            return None
        if self._scorer is None:
            state = "still loading" if self.scorer_state == "loading" else self.scorer_state
            raise ApiError(503, f"guided modes are unavailable: the scorer is {state}", code="scorer_unavailable",
                           headers={"Retry-After": "5"} if self.scorer_state == "loading" else None)
        return self._scorer

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

    async def __aenter__(self) -> GuidanceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ every request

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Auth on /v1/*, every exception answered in OpenAI's shape, and the request metrics."""
        t0 = time.perf_counter()
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "other"
        status = 500
        try:
            if request.path.startswith("/v1/"):
                self._keys.check(request)
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
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return internal_error().response()
        finally:
            self.metrics.request_done(endpoint, status, time.perf_counter() - t0)

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
        return json_response(ModelList(data=[ModelCard(id=m) for m in self.modes.model_ids()]))

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})
