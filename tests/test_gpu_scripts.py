"""benchmarks/gpu/: the scripts a lent GPU machine runs (docs/gpu.md), dry-run on CPU so they keep working.

The only untried part is CUDA itself: run.py goes through every section with a tiny random
Mistral pair on the CPU; fetch_wheels.py lists what it would carry without touching the network.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "benchmarks" / "gpu"

pytestmark = pytest.mark.slow


def test_run_dry_on_cpu(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-W", "ignore", str(GPU / "run.py"), "--device", "cpu", "--model", "tiny", "--out", str(out),
         "--budget-s", "60", "--check-steps", "1", "--max-step", "3", "--searches", "1", "2", "--server-repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (out / "tables.md").read_text()
    data = json.loads((out / "results.json").read_text())
    sections = data["sections"]
    for key in ("correctness", "cache", "throughput", "memory", "recompute", "server", "skipped"):
        assert key in sections, (key, md)
    assert sections["correctness"]["passed"] is True
    assert [r[0] for r in sections["cache"]["rows"][1:]] == ["batching (unbounded cache)",
                                                             "eviction (max_cached_tokens 600)"]
    assert [r[0] for r in sections["throughput"]["rows"][1:]] == ["1", "2"]
    assert [r[0] for r in sections["recompute"]["rows"][1:]] == ["incremental", "full recompute", "full / incremental"]
    assert [r[0] for r in sections["server"]["rows"][1:]] == ["1", "8", "64"]
    assert data["device"] == "cpu" and data["card"].startswith("CPU")
    assert "| float32, eager attention, 2 layers" in md and "GFLOP per scored token" in md


def test_fetch_wheels_dry_run_lists_without_network():
    p = subprocess.run([sys.executable, str(GPU / "fetch_wheels.py"), "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    listed = {line.strip().split("==")[0] for line in p.stdout.splitlines() if "==" in line}
    assert {"pydantic", "pydantic-core", "openai", "pytest-asyncio"} <= listed  # not in the GPU image
    assert not listed & {"torch", "transformers", "numpy", "tokenizers"}  # the image has these
    assert "tokenizer-32k" in p.stdout


def test_wheels_folder_is_ignored():
    p = subprocess.run(["git", "check-ignore", "-q", "benchmarks/gpu/wheels/x.whl"], cwd=ROOT)
    assert p.returncode == 0
