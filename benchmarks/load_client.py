"""The load generator for benchmarks/server.py, in its own process so its CPU is not the server's.

It reads one JSON command per line on stdin and answers one JSON line on stdout:
    {"op": "overhead", "direct": URL, "proxied": URL, "n": N, "warmup": W}
        -> {"direct": [s, ...], "proxied": [s, ...]}   (interleaved sequential requests)
    {"op": "burst", "url": URL, "concurrency": C, "body": {...}}
        -> {"makespan_s": s, "answers": [...]}        (C requests at once; the body's
           `{i}` in the last message and "seed" are made unique per request)
    {"op": "quit"}
It prints {"ready": true} once started, so process start-up is never timed.
"""
from __future__ import annotations

import asyncio
import copy
import json
import sys
import time
from typing import Any

import aiohttp


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data}")
        return data


async def overhead(session: aiohttp.ClientSession, cmd: dict[str, Any]) -> dict[str, Any]:
    """Plain requests, direct and proxied in turn, so drift on a shared machine hits both alike."""
    out: dict[str, list[float]] = {"direct": [], "proxied": []}
    for i in range(cmd["n"] + cmd["warmup"]):
        body = {"model": cmd["model"], "prompt": f"Request {i % 7}", "max_tokens": 8, "seed": i}
        for path in ("direct", "proxied"):
            t0 = time.perf_counter()
            await post(session, cmd[path], body)
            if i >= cmd["warmup"]:
                out[path].append(time.perf_counter() - t0)
    return out


def _numbered(body: dict[str, Any], i: int) -> dict[str, Any]:
    b = copy.deepcopy(body)
    b["seed"] = i
    b["messages"][-1]["content"] = b["messages"][-1]["content"].format(i=i)
    return b


async def burst(session: aiohttp.ClientSession, cmd: dict[str, Any]) -> dict[str, Any]:
    bodies = [_numbered(cmd["body"], i) for i in range(cmd["concurrency"])]
    t0 = time.perf_counter()
    answers = await asyncio.gather(*(post(session, cmd["url"], b) for b in bodies))
    return {"makespan_s": time.perf_counter() - t0, "answers": answers}


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        print(json.dumps({"ready": True}), flush=True)
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            result = await (overhead if cmd["op"] == "overhead" else burst)(session, cmd)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
