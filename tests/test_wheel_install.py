"""A wheel install carries the presets (issue 11).

Builds the wheel from a copy of the source tree, installs it into a fresh virtualenv and runs
that venv's `w2s` from another directory against the loopback upstream. Nothing is downloaded:
the project's dependencies come from this interpreter's site-packages through a .pth file, and
the wheel goes in with `--no-deps --no-index`.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from proxy.testing.toy_server import ToyCompletionsServer

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                              ".pytest_cache", ".w2s-cache", "tests", "benchmarks", "runs")

pytestmark = pytest.mark.slow


def _run(*cmd: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a copy, so the build writes no build/ or egg-info into the working tree
    src = tmp_path_factory.mktemp("src") / "w2s-proxy"
    shutil.copytree(REPO, src, ignore=SKIP)
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", out, src)
    (built,) = out.glob("w2s_proxy-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed; returns its scripts folder."""
    root = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", root)
    bin_dir = root / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    # the dependencies already installed here, after the venv's own site-packages
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (site / "_w2s_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    return bin_dir


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("W2S_CONFIG_DIR", "PYTHONPATH")}
    env.update(extra)
    return env


def _preset_files() -> set[str]:
    return {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}


def test_the_wheel_ships_every_preset(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"upstreams/gpt-3.5-turbo-instruct.yaml", "search/base.yaml", "paper-bon4.yaml"} <= _preset_files()
    assert {f"w2s_presets/{f}" for f in _preset_files()} <= names
    assert not any(n.startswith("configs/") for n in names)
    # the tuned guide's adapter travels with the package too
    adapter = "scorers/adapters/smollm2-135m-film-dpo/"
    assert {adapter + "adapter_model.safetensors", adapter + "adapter_config.json"} <= names


async def test_installed_w2s_runs_presets_from_another_directory(venv: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(venv / "python", "-c", "import proxy, w2s_presets; print(proxy.__file__); print(w2s_presets.__file__)",
                 cwd=elsewhere)
    for line in where.split():
        assert Path(line).is_relative_to(venv.parent), f"imported from outside the venv: {line}"

    upstream = "gpt-3.5-turbo-instruct"
    key_env = yaml.safe_load((CONFIGS / "upstreams" / f"{upstream}.yaml").read_text())["api_key_env"]
    w2s = venv / "w2s"

    async def w2s_run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            w2s, *args, cwd=elsewhere, env=_env(**{key_env: "sk-test"}),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async with ToyCompletionsServer() as server:
        config = elsewhere / "toy.yaml"
        config.write_text(yaml.safe_dump({"upstream": {"preset": upstream, "base_url": server.base_url},
                                          "search": "base"}))
        rc, out, err = await w2s_run("generate", "--config", config.name, "--seed", "3", "Name a colour.")
        assert rc == 0, err
        assert server.completed >= 1
        answer, _, summary = out.strip().rpartition("\n\n")
        assert answer.strip(), out
        assert summary.startswith("mode base "), out

    # an unknown preset name fails listing the presets the installed package carries
    rc, out, err = await w2s_run("generate", "--config", "no-such-preset", "hi")
    assert rc == 2
    top_level = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert f"no file and no preset named 'no-such-preset' (presets: {', '.join(top_level)};" in err
    # a missing file names the path
    rc, out, err = await w2s_run("generate", "--config", "missing/config.yaml", "hi")
    assert rc == 2 and "config file not found: missing/config.yaml" in err
