"""`w2s serve-local MODEL`: a transformers causal LM as an OpenAI completions server on 127.0.0.1.

The wire protocol (validation, errors, usage) is proxy.local.server's; the text comes from the
model (proxy.local.causal_lm). Point an upstream's `base_url` at it to guide a model you host yourself.
"""
from __future__ import annotations

import argparse
import asyncio

from proxy.config import ModelSpec
from proxy.config.extras import require
from proxy.local.backend import DEFAULT_MAX_BATCH_ROWS
from proxy.local.server import LocalCompletionsServer


async def serve_local(args: argparse.Namespace) -> int:
    require("local", "torch", "transformers", use="`w2s serve-local`")
    from proxy.local.causal_lm import LocalCausalLM  # torch: only when a model is really served
    from scorers.registry import set_torch_threads

    set_torch_threads(args.torch_threads)
    spec = ModelSpec(path=args.model, gguf_file=args.gguf_file)
    lm = await asyncio.to_thread(LocalCausalLM.load, spec, args.device, args.dtype, max_batch_rows=args.max_batch_rows)
    server = LocalCompletionsServer(lm, model=args.name or args.model)
    await server.start(args.port)
    print(f"serving {args.model} at {server.base_url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
        lm.close()
    return 0


def batch_rows(text: str) -> int:
    """--max-batch-rows: refused before the model loads, not by the batcher after."""
    rows = int(text) if text.strip().isdigit() else 0
    if rows < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of rows, at least 1 (got {text!r})")
    return rows


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve-local", help="serve a local causal LM as an OpenAI completions API on 127.0.0.1")
    p.add_argument("model", help="hub id or local directory (with --gguf-file for a GGUF file inside it)")
    p.add_argument("--gguf-file")
    p.add_argument("--name", help="model name clients use (default: MODEL)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--torch-threads", type=int, metavar="N",
                   help="torch's CPU threads (default: torch's, one per core); on a CPU box that also "
                        "scores, give each process half the cores")
    p.add_argument("--max-batch-rows", type=batch_rows, default=DEFAULT_MAX_BATCH_ROWS, metavar="N",
                   help=f"rows (prompts x n) decoded together (default {DEFAULT_MAX_BATCH_ROWS}); 1 decodes each "
                        "request alone, so that a seeded request's samples are bit-identical whatever else is "
                        "in flight (a shared batch rounds its logits differently), at the cost of throughput")
    p.set_defaults(func=serve_local)
