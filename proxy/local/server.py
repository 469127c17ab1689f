"""An OpenAI completions server on 127.0.0.1 over any `CompletionBackend`.

This is how a model we run ourselves (the demo's black box, `w2s serve-local`, the toy model in
tests) reaches the search through exactly the code path a paid API takes: the real openai
client, its error classes, its retry headers. Requests are validated by
`proxy.protocol.model_requests`; a list of prompts is answered as OpenAI does, n choices per prompt,
prompt-major by `index`, usage summed.
"""
from __future__ import annotations

import asyncio
import json
from types import TracebackType

from aiohttp import web
from pydantic import ValidationError

from proxy.local.backend import Choice, CompletionBackend
from proxy.protocol.model_requests import CompletionParams, ModelCompletionRequest
from proxy.protocol.responses import CompletionChoice, CompletionResponse, ModelCard, ModelList, UsageInfo
from proxy.serving.body import read_body
from proxy.serving.errors import ApiError, validation_error
from proxy.serving.site import listen

SHUTDOWN_TIMEOUT_S = 0.5
"""stop() waits this long for in-flight handlers, then cancels them."""


class LocalCompletionsServer:
    """GET /v1/models and POST /v1/completions answered by `backend`; anything else is an
    OpenAI-shaped 404. Use as `async with LocalCompletionsServer(backend, model=...) as s:` and
    point a client at `s.base_url`."""

    def __init__(self, backend: CompletionBackend, *, model: str, owned_by: str = "w2s-local") -> None:
        self.backend = backend
        self.model = model
        self.owned_by = owned_by
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> str:
        """Listen on 127.0.0.1:`port` (0: an ephemeral port) and return the base URL (".../v1")."""
        if self._runner is not None:
            raise RuntimeError("server already started")
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        # handler_cancellation: a client that gives up (timeout, cancelled task) cancels our
        # handler, as a real server stops generating; aiohttp disables this by default.
        self._runner, root = await listen(app, "127.0.0.1", port, handler_cancellation=True,
                                          shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None,
                                          auto_decompress=False)  # decoded by proxy.serving.body
        self.base_url = f"{root}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening; handlers still running after a short grace period are cancelled."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> "LocalCompletionsServer":
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _models(self, request: web.Request) -> web.Response:
        body = ModelList(data=[ModelCard(id=self.model, owned_by=self.owned_by)])
        return web.json_response(text=body.model_dump_json())

    async def _unknown(self, request: web.Request) -> web.Response:
        return ApiError(404, f"Unknown route: {request.method} {request.path}", code="unknown_url").response()

    async def _completions(self, request: web.Request) -> web.Response:
        try:
            raw = await read_body(request)
        except ApiError as e:
            return e.response()
        return await self.respond(raw)

    async def respond(self, raw: bytes) -> web.Response:
        """The answer to one POSTed body: 200, or an OpenAI-shaped 400 naming the bad field."""
        try:
            batch = self.parse(raw)
            return self.answer(batch, await self.run(batch))
        except ApiError as e:
            return e.response()

    async def run(self, batch: list[CompletionParams]) -> list[tuple[list[Choice], int]]:
        """Each prompt's choices and token count; ApiError (a 400) when the backend refuses one.
        The prompts of a list go to the backend together, so a batching backend decodes them at once."""
        return list(await asyncio.gather(*(self.backend.complete(p) for p in batch)))

    @staticmethod
    def parse(raw: bytes) -> list[CompletionParams]:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested past what the parser can hold
            raise ApiError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
        try:
            return ModelCompletionRequest.model_validate(body).params()
        except ValidationError as e:
            raise validation_error(e) from None

    def answer(self, batch: list[CompletionParams], results: list[tuple[list[Choice], int]]) -> web.Response:
        choices = [c for chosen, _ in results for c in chosen]
        prompt_tokens = sum(n for _, n in results)
        completion_tokens = sum(c.tokens for c in choices)
        body = CompletionResponse(
            model=self.model,
            choices=[CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason)  # type: ignore[arg-type]
                     for i, c in enumerate(choices)],
            usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens))
        return web.json_response(text=body.model_dump_json(exclude={"w2s"}))
