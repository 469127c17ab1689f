"""The structure checks anyone can run (scripts/check_structure.py): the repository passes them,
and each rule really catches what it names, on small made-up trees."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_structure.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"proxy/__init__.py": "", "scorers/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_repository_keeps_its_structure():
    done = _run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("structure ok:")


def test_a_clean_tree_passes(tmp_path: Path):
    root = _tree(tmp_path, {
        "proxy/types.py": "X = 1\n",
        "proxy/config/__init__.py": "from proxy.config.base import Base\n",
        "proxy/config/base.py": "from ..types import X\nclass Base: ...\n",
        "proxy/upstreams/retry.py": "from proxy.types import X\n",
        "scorers/remote.py": "from proxy.config import Base\nfrom proxy.upstreams.retry import X\n",
        "proxy/engine.py": "from scorers.remote import Base\n",
    })
    done = _run("--root", str(root))
    assert done.returncode == 0, done.stdout
    assert "8 modules" in done.stdout  # each __init__.py is its package's module


def test_cycles_are_found_through_late_relative_and_submodule_imports(tmp_path: Path):
    root = _tree(tmp_path, {
        "proxy/serving/__init__.py": "",
        "proxy/serving/app.py": "from . import routes\n",  # `from pkg import submodule`
        "proxy/serving/routes.py": """\
            def handler():
                from ..engine import run  # inside a function: still an edge
                return run
            """,
        "proxy/engine.py": "import proxy.serving.app\ndef run(): ...\n",
        "proxy/a.py": "from proxy import b\n",
        "proxy/b.py": "from proxy.a import thing\n",
    })
    done = _run("--root", str(root))
    assert done.returncode == 1
    cycles = sorted(line for line in done.stdout.splitlines() if line.startswith("cycle:"))
    assert cycles == [
        "cycle: proxy.a -> proxy.b -> proxy.a [proxy/a.py:1, proxy/b.py:1]",
        "cycle: proxy.engine -> proxy.serving.app -> proxy.serving.routes -> proxy.engine "
        "[proxy/engine.py:1, proxy/serving/app.py:1, proxy/serving/routes.py:2]",
    ]


def test_scorers_may_import_only_the_layers_below(tmp_path: Path):
    root = _tree(tmp_path, {
        "proxy/types.py": "",
        "proxy/config/__init__.py": "",
        "proxy/upstreams/__init__.py": "",
        "proxy/film_reviews/__init__.py": "",
        "proxy/film_reviews/judges.py": "",
        "proxy/serving/__init__.py": "",
        "scorers/tuning/__init__.py": "",
        "scorers/tuning/cli.py": """\
            import proxy.types, proxy.config, proxy.upstreams
            def run():
                from proxy.film_reviews.judges import JUDGES
                from ...proxy import serving
            """,
    })
    done = _run("--root", str(root))
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines[:-1]] == [
        "layering: scorers/tuning/cli.py:3 imports proxy.film_reviews.judges",
        "layering: scorers/tuning/cli.py:4 imports proxy.serving",  # relative, from three levels up
    ]
    assert lines[-1] == "2 structure problem(s)"


def test_long_modules_are_named(tmp_path: Path):
    root = _tree(tmp_path, {"scorers/long.py": "x = 1\n" * 331, "scorers/fits.py": "x = 1\n" * 330})
    done = _run("--root", str(root))
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["size: scorers/long.py has 331 lines (at most 330)", "1 structure problem(s)"]
