"""Listening on a socket, the one way every aiohttp server of ours does it (the guidance server,
the local completions server, the test fakes).

Requests aiohttp refuses before any handler runs (a malformed head, `Transfer-Encoding: gzip`, an
`Expect` other than 100-continue) are answered here in OpenAI's shape, like every other refusal,
and without the ERROR traceback aiohttp would log for each: they come before authentication, so
anyone could fill the log with them. Such a request is logged at DEBUG, without its content.
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.serving.errors import ApiError, internal_error

log = logging.getLogger("w2s.server")


def protocol_error(status: int) -> ApiError:
    """The refusal of a request aiohttp could not take, in OpenAI's shape (never its content)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Bad Request"
    return ApiError(status, f"Malformed HTTP request: {status} {phrase}.", code="malformed_request")


class _JsonErrorsHandler(RequestHandler):
    """aiohttp's connection handler, writing the errors it makes itself in OpenAI's shape."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response already begun: the connection is broken
            raise ConnectionError("Response is sent already, cannot send another response")
        if status >= 500:  # an exception no handler caught: ours, so logged in full
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            response = internal_error().response()
        else:  # the client's malformed request: no traceback, and nothing it sent
            log.debug("malformed HTTP request refused with %d (%s)", status, type(exc).__name__)
            response = protocol_error(status).response()
        response.force_close()
        return response


class _JsonErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer  # the same server, making our connection handlers
        return server


async def _json_http_errors(request: web.Request, response: web.StreamResponse) -> None:
    """An aiohttp HTTPException that reached no middleware (the `Expect` check runs before
    them) rewritten in OpenAI's shape."""
    if isinstance(response, web.HTTPException) and response.status >= 400 and response.content_type == "text/plain":
        body = protocol_error(response.status).body.model_dump_json().encode()
        response.body = body
        response.content_type = "application/json"
        response.headers["Content-Length"] = str(len(body))  # set when aiohttp made its text body


async def listen(app: web.Application, host: str, port: int, **runner_options: Any) -> tuple[web.AppRunner, str]:
    """Serve `app` on host:port (port 0: an ephemeral one); return the runner and the root URL
    it is bound to ("http://host:port"). If listening fails (a busy port) nothing is left running."""
    if not app.on_response_prepare.frozen:
        app.on_response_prepare.append(_json_http_errors)
    runner = _Runner(app, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"
