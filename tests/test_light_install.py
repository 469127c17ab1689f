"""The light install: `pip install w2s-proxy` without extras has no torch, serves plain mode, and
refuses a guide whose extra is missing with an error naming it.

How a clean install is simulated, offline and in seconds: the wheel goes into a fresh virtualenv
with `--no-deps --no-index`, as in tests/test_wheel_install.py, but the dependencies do not come
from this interpreter's whole site-packages (which holds torch, for the other tests). A shadow
folder holds links to exactly the distributions the wheel's own metadata requires (the closure
of its Requires-Dist, extras evaluated as asked, each distribution's files from its RECORD), and
a .pth file puts that folder on the venv's path. So a package outside the core is truly absent
there: `import torch` fails and importlib.util.find_spec says None, as after a real light
install. (A real `pip install` of the core from PyPI checks the same but needs the network and
takes about a minute; this takes seconds.)
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import openai
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy.testing.toy_server import ToyCompletionsServer
from tests.test_wheel_install import wheel  # noqa: F401 - the fixture: the wheel built once from a copy

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "numpy", "accelerate", "gguf", "trl", "peft", "vaderSentiment", "textblob")
MODEL = "toy-model"

pytestmark = pytest.mark.slow


def _run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(z.read(name).decode()).get_all("Requires-Dist") or []


def closure(own: list[str], extras: set[str]) -> dict[str, metadata.Distribution]:
    """Every installed distribution that w2s-proxy (requirements `own`) with `extras` pulls in."""
    found: dict[str, metadata.Distribution] = {}
    todo: list[tuple[list[str], set[str]]] = [(own, extras)]
    seen_self: set[str] = set(extras)
    while todo:
        requires, wanted = todo.pop()
        for line in requires:
            req = Requirement(line)
            envs = [{"extra": e} for e in sorted(wanted)] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            name = canonicalize_name(req.name)
            if name == "w2s-proxy":  # a self-reference (`w2s-proxy[remote]`): the wheel's own lines
                new = set(req.extras) - seen_self
                seen_self |= new
                if new:
                    todo.append((own, new))
                continue
            if name in found:
                continue
            found[name] = dist = metadata.distribution(req.name)
            todo.append((dist.requires or [], set(req.extras)))
    return found


def shadow_site(dists: dict[str, metadata.Distribution], where: Path) -> Path:
    """A folder of links to the top-level files and folders of exactly `dists`."""
    where.mkdir()
    for dist in dists.values():
        tops = {Path(f).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (where / top).exists():
                (where / top).symlink_to(source)
    return where


@pytest.fixture(scope="module")
def light(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel and only the core's dependencies; its scripts folder."""
    root = tmp_path_factory.mktemp("light")
    core = closure(_wheel_requires(wheel), set())
    assert not {canonicalize_name(h) for h in HEAVY} & set(core), sorted(core)
    shadow = shadow_site(core, root / "core-site")
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", venv)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    site = Path(_run(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    (site / "_w2s_core_dependencies.pth").write_text(f"{shadow}\n")
    _run(bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    return bin_dir


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("W2S_CONFIG_DIR", "PYTHONPATH")}
    env.update(extra)
    return env


def test_the_core_install_has_no_torch(light: Path, tmp_path: Path) -> None:
    probe = ("import importlib.util, sys; import proxy.cli, proxy.serving.app, proxy.engine, scorers.registry; "
             f"absent = [m for m in {HEAVY!r} if importlib.util.find_spec(m) is None]; "
             "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')]; "
             "print(len(absent), loaded, proxy.cli.__file__)")
    out = _run(light / "python", "-c", probe, cwd=tmp_path, env=_env()).split(maxsplit=2)
    assert out[0] == str(len(HEAVY)) and out[1] == "[]", out
    assert Path(out[2].strip()).is_relative_to(light.parent), out


def test_the_remote_extra_needs_no_torch(wheel: Path, light: Path, tmp_path: Path) -> None:
    """[remote] adds tokenizers and templates; the remote scorer's modules import without torch."""
    remote = closure(_wheel_requires(wheel), {"remote"})
    assert "transformers" in remote and "torch" not in remote, sorted(remote)
    shadow = shadow_site(remote, tmp_path / "remote-site")
    probe = ("import importlib.util, sys; import scorers.remote, scorers.registry; "
             "assert importlib.util.find_spec('torch') is None; assert 'torch' not in sys.modules; print('ok')")
    assert _run(light / "python", "-c", probe, cwd=tmp_path, env=_env(PYTHONPATH=str(shadow))).strip() == "ok"


async def _serve(w2s: Path, config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        w2s, "serve", "--config", str(config), "--port", "0", cwd=config.parent, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_light_install_serves_plain_mode_and_names_missing_extras(light: Path, tmp_path: Path) -> None:
    async with ToyCompletionsServer() as upstream:
        upstream_cfg = {"model": MODEL, "base_url": upstream.base_url}
        plain = tmp_path / "plain.yaml"
        plain.write_text(yaml.safe_dump({"upstream": upstream_cfg}))
        proc = await _serve(light / "w2s", plain)
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line.startswith("w2s: serving http://127.0.0.1:"), line
            async with openai.AsyncOpenAI(base_url=line.split()[2], api_key="x", max_retries=0) as client:
                r = await client.completions.create(model=MODEL, prompt="hello", max_tokens=3, seed=1)
            assert r.choices and upstream.requests[-1]["prompt"] == "hello"
        finally:
            if proc.returncode is None:
                proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0 and b"Traceback" not in err, err.decode()

        # a guide this install cannot run: refused before listening, naming the extra to install
        for kind, extra in (("implicit", "local"), ("remote", "remote")):
            side = {"path": "HuggingFaceTB/SmolLM2-135M"}
            if kind == "remote":
                side["engine"] = {"base_url": upstream.base_url}  # type: ignore[assignment]
            guided = tmp_path / f"{kind}.yaml"
            guided.write_text(yaml.safe_dump({"upstream": upstream_cfg,
                                              "scorer": {"kind": kind, "tuned": side, "untuned": side}}))
            proc = await _serve(light / "w2s", guided)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            text = err.decode()
            assert proc.returncode == 2, (out.decode(), text)
            assert f"w2s-proxy[{extra}]" in text and f"pip install 'w2s-proxy[{extra}]'" in text, text
            assert "Traceback" not in text and b"w2s: serving" not in out, text


def test_the_make_install_line_still_installs_every_extra() -> None:
    """`make install` runs `pip install -e '.[test]'`: test must pull in every extra, and the
    core none of the heavy packages."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "'.[test]'" in (REPO / "Makefile").read_text()
    extras = project["optional-dependencies"]
    reached, todo = set(), ["test"]
    while todo:
        for line in extras[todo.pop()]:
            req = Requirement(line)
            if req.name == "w2s-proxy":
                todo += sorted(set(req.extras) - reached)
                reached |= req.extras
    assert reached == set(extras) - {"test"}, reached
    assert not any(Requirement(d).name in HEAVY for d in project["dependencies"]), project["dependencies"]
