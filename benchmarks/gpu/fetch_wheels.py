"""Fetch, on a machine with PyPI, what a bare GPU machine needs beyond its image (issue 28).

    .venv/bin/python benchmarks/gpu/fetch_wheels.py            # wheels + tokenizer into benchmarks/gpu/wheels/
    .venv/bin/python benchmarks/gpu/fetch_wheels.py --dry-run  # only list what it would fetch (no network)

The lent GPU machine (see docs/gpu.md) has Python 3.12 with torch, transformers and the
packages in IMAGE below, and no network. This script walks the project's dependencies (its
pyproject, plus pytest-asyncio for the tests) through each wheel's Requires-Dist, skips what the
image already holds, and downloads the rest with `pip download --no-deps` for CPython 3.12 on
manylinux x86-64, each at the version installed in this checkout's .venv, so the GPU run uses
what the CPU tests used. It also writes a 32,000-token tokenizer (SmolLM2's byte-level BPE cut
to its first 32,000 ids, the vocabulary size of Mistral-7B) to wheels/tokenizer-32k/, since the
GPU machine cannot reach the hub. The folder must stay under the 64 MiB the device carries with
the working tree; the script fails above LIMIT_MIB.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "benchmarks" / "gpu" / "wheels"
LIMIT_MIB = 60
VOCAB = 32000

# The device image's Python packages ('cuda' image, read 2026-11-17; /work/.library/device/KINDS.md).
IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
# In the image, but carried anyway: small, pure Python, and our pins need newer ones than an image may hold.
ALWAYS = {"typing-extensions", "anyio", "idna"}
EXTRA_ROOTS = ["pytest-asyncio"]  # the test runner's async plugin
EXTRAS = ["local"]  # the in-process guide (where pyproject has such an extra); not the demo's judges
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64", "manylinux_2_5_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed() -> dict[str, str]:
    """{name: version} to carry: the closure of the project's requirements, less the image's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + EXTRA_ROOTS]
    extras, seen_extras = list(EXTRAS), set()
    while extras:  # the extras, following self-references such as "w2s-proxy[remote]"
        extra = extras.pop()
        seen_extras.add(extra)
        for r in map(Requirement, project.get("optional-dependencies", {}).get(extra, [])):
            if norm(r.name) == norm(project["name"]):
                extras.extend(e for e in r.extras if e not in seen_extras)
            else:
                todo.append(r)
    out: dict[str, str] = {}
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate(MARKER_ENV)):
            continue
        seen.add(name)
        if name in IMAGE and name not in ALWAYS:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in this environment; install the project first "
                             "(pip install -e '.[test]')")
        out[name] = dist.version
        todo.extend(Requirement(r) for r in dist.requires or [])
    return dict(sorted(out.items()))


def download(pins: dict[str, str], dest: Path) -> None:
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
            "-d", str(dest)]
    for p in PLATFORMS + ["any"]:
        base += ["--platform", p]
    for name, version in pins.items():
        subprocess.run(base + [f"{name}=={version}"], check=True)


def tokenizer_source() -> Path | None:
    """SmolLM2-135M-Instruct's tokenizer: the demo's converted copy if this machine has it."""
    cache = Path.home() / ".cache" / "w2s-proxy" / "gguf-converted"
    found = sorted(cache.glob("SmolLM2-135M-Instruct*/tokenizer.json"))
    return found[0].parent if found else None


def write_tokenizer(src: Path | None, dest: Path) -> None:
    """SmolLM2's byte-level BPE with ids >= VOCAB and the merges that make them removed."""
    if src is None:
        from huggingface_hub import snapshot_download

        src = Path(snapshot_download("HuggingFaceTB/SmolLM2-135M-Instruct",
                                     allow_patterns=["tokenizer.json", "tokenizer_config.json", "*.jinja"]))
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < VOCAB}
    merges = [m for m in tok["model"]["merges"]
              if (m.replace(" ", "", 1) if isinstance(m, str) else "".join(m)) in vocab]
    tok["model"]["vocab"], tok["model"]["merges"] = vocab, merges
    tok["added_tokens"] = [a for a in tok.get("added_tokens", []) if a["id"] < VOCAB]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    for extra in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / extra).exists():
            shutil.copy(src / extra, dest / extra)


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list what would be fetched; no network, no writes")
    ap.add_argument("--dest", type=Path, default=WHEELS)
    args = ap.parse_args()
    pins = needed()
    src = tokenizer_source()
    print(f"{len(pins)} packages beyond the GPU image (versions of this .venv):")
    for name, version in pins.items():
        print(f"  {name}=={version}")
    print(f"tokenizer: {src or 'HuggingFaceTB/SmolLM2-135M-Instruct from the hub'} -> first {VOCAB} ids, "
          f"{args.dest / 'tokenizer-32k'}")
    if args.dry_run:
        return 0
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    download(pins, args.dest)
    write_tokenizer(src, args.dest / "tokenizer-32k")
    wheels = sorted(args.dest.glob("*.whl"))
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    total = size_mib(args.dest)
    print(f"{len(wheels)} wheels + tokenizer: {total:.1f} MiB in {args.dest} (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB:
        print("too large to carry to the device", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
