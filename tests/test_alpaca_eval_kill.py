"""A real kill: `python -m proxy.cli alpaca-eval` in a subprocess against a loopback server in
this process, SIGKILLed part-way, then the same command again. The result must equal an
uninterrupted run: same instructions in the same order, no item answered twice."""
from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import yaml

from proxy.alpaca_eval.checkpoint import CHECKPOINT_NAME
from proxy.alpaca_eval.dataset import read_instruction_file, select
from proxy.alpaca_eval.outputs import OUTPUTS_NAME
from proxy.alpaca_eval.runner import run_alpaca_eval
from proxy.client import GuidedClient
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.presets import load_config

REPO = Path(__file__).resolve().parent.parent
ODD = ["  leading and trailing spaces  ", "line one\r\nline two\n", "naïve café — 東京 🙂", ""]
ITEMS = 24
KILL_AFTER = 5  # answered items in the checkpoint


async def run_cli(*args: str, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as f:
        return await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy.cli", *args, cwd=REPO,
                                                    stdout=f, stderr=f)


def answered(checkpoint: Path) -> int:
    try:
        lines = checkpoint.read_bytes().split(b"\n")
    except FileNotFoundError:
        return 0
    # lines[0] is the header; lines[-1] is what follows the last newline (empty, or a torn line)
    return sum(1 for x in lines[1:-1] if b'"status":"ok"' in x)


async def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    texts = ODD + [f"Question {i}: what is {i} plus {i}?" for i in range(ITEMS - len(ODD))]
    data = [{"instruction": t, "dataset": "kill", "output": "reference", "generator": "gpt4"} for t in texts]
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out, log = tmp_path / "out", tmp_path / "cli.log"

    async with ToyCompletionsServer(latency_s=0.15) as server:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "upstream": {"model": "toy-instruct", "base_url": server.base_url, "backoff_initial_s": 0.01},
            "search": {"w": 1, "k": 1, "max_new_tokens": 16, "seed": 11},
        }))
        cmd = ["alpaca-eval", "--config", str(config), "--output", str(out), "--instructions", str(instructions),
               "--concurrency", "2"]

        proc = await run_cli(*cmd, log=log)
        deadline = time.monotonic() + 60
        while answered(out / CHECKPOINT_NAME) < KILL_AFTER:
            assert proc.returncode is None, log.read_text()
            assert time.monotonic() < deadline, "the run never got going: " + log.read_text()
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        done_at_kill = answered(out / CHECKPOINT_NAME)
        assert KILL_AFTER <= done_at_kill < ITEMS  # killed part-way
        assert not (out / OUTPUTS_NAME).exists()

        proc = await run_cli(*cmd, log=log)
        assert await asyncio.wait_for(proc.wait(), 120) == 0, log.read_text()

        # the same run, never interrupted, in process
        cfg = load_config(config)
        async with GuidedClient(cfg) as client:
            await run_alpaca_eval(client, select(read_instruction_file(instructions), "x"), tmp_path / "ref",
                                  progress=False)

    resumed = json.loads((out / OUTPUTS_NAME).read_text(encoding="utf-8"))
    reference = json.loads((tmp_path / "ref" / OUTPUTS_NAME).read_text(encoding="utf-8"))
    assert [r["instruction"] for r in resumed] == texts
    assert resumed == reference
    records = [json.loads(x) for x in (out / CHECKPOINT_NAME).read_text(encoding="utf-8").splitlines()[1:]]
    assert sorted(r["index"] for r in records if r["status"] == "ok") == list(range(ITEMS))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed"], summary["this_run"]["attempted"], summary["complete"]) == \
        (done_at_kill, ITEMS - done_at_kill, True)
