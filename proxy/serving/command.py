"""`w2s serve`: the guidance server as a process, until interrupted or terminated.

SIGTERM (what Docker, Kubernetes and systemd send, and the only stop a shell's background job
gets, since such a job ignores SIGINT) drains like Ctrl-C: the server stops taking requests,
lets those in flight finish within its grace period (10 s), answers those still running near its
end with `server_shutting_down` (a 503, or a stream's error event), closes the upstream
connections, and the process exits 0, within the grace period.

    w2s serve --config configs/paper-cbs-w4k4l30.yaml

Apart from proxy.serving.app because owning the process is a different job from serving: only
the process owner may freeze the heap (below) or wait forever; tests and benchmarks embed the
GuidanceServer itself.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
from typing import Any

from proxy import tracing
from proxy.presets import load_config
from proxy.serving.app import GuidanceServer


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="OpenAI-compatible server: guided answers for any OpenAI client")
    p.add_argument("--config", required=True, help="config file or preset name under configs/")
    p.add_argument("--host", help="default: server.host (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: server.port (8000); 0 picks a free port")
    p.add_argument("--otel", action="store_true",
                   help="export OpenTelemetry spans over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT; default "
                        "server.otel); needs w2s-proxy[otel]")
    p.set_defaults(func=serve)


def freeze_heap() -> None:
    """Exempt everything alive now (modules, schemas, model objects) from the cyclic GC.

    A full collection walks every tracked object, and with openai's types and torch loaded a
    walk stalls the event loop for tens to hundreds of milliseconds; objects made at startup
    live for the whole process anyway. Only the process owner (`w2s serve`) may do this.
    """
    gc.collect()
    gc.freeze()


async def until_sigterm() -> None:
    """Return when the process gets SIGTERM (Ctrl-C raises KeyboardInterrupt as usual); the
    caller then drains its server."""
    terminated = asyncio.Event()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' loop
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminated.set)
    await terminated.wait()


async def serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    # Before anything serves: a missing `otel` extra is the CLI's ConfigError naming it.
    exporting = tracing.export_otlp() if getattr(args, "otel", False) or cfg.server.otel else None
    server = GuidanceServer(cfg, access_log=getattr(args, "verbose", 0) > 0)  # -v: one line a request
    await server.start(args.host, args.port)
    freeze_heap()
    loaded: asyncio.Task[None] | None = None
    try:
        print(f"w2s: serving {server.base_url}  models: {', '.join(server.modes.model_ids())}", flush=True)
        if server.engine.scorer_state == "loading":
            print("w2s: loading the scorer; GET /health/ready says when guided modes are available", flush=True)

            async def freeze_when_loaded() -> None:
                with contextlib.suppress(RuntimeError):
                    await server.wait_ready()
                freeze_heap()

            loaded = asyncio.create_task(freeze_when_loaded())
        await until_sigterm()
        print("w2s: SIGTERM: draining in-flight requests", flush=True)
    finally:
        if loaded is not None:
            loaded.cancel()
        await server.stop()
        if exporting is not None:  # the spans still batched go out before the process ends
            exporting.shutdown()
    return 0
