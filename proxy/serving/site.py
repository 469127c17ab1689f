"""Listening on a socket, the one way every aiohttp server of ours does it (the guidance server,
the local completions server, the test fakes)."""
from __future__ import annotations

from typing import Any

from aiohttp import web


async def listen(app: web.Application, host: str, port: int, **runner_options: Any) -> tuple[web.AppRunner, str]:
    """Serve `app` on host:port (port 0: an ephemeral one); return the runner and the root URL
    it is bound to ("http://host:port"). If listening fails (a busy port) nothing is left running."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"
