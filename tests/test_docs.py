"""The manual builds and the README stays a front door.

`mkdocs build --strict` fails on any warning, and mkdocs.yml turns broken links, missing anchors,
pages left out of the nav and absolute links into warnings: so a page that links to a heading
renamed elsewhere fails here, not in a reader's browser.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# [text](target) and ![alt](target); a target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_the_manual_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages, "no pages under docs/"
    assert [p for p in pages if not re.search(rf":\s*{re.escape(p)}\s*$", nav, re.MULTILINE)] == []


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual (docs/) is the place for more"
    body = [line for line in lines if line.strip()]
    assert body[0].startswith("# "), "the README starts with its title"
    assert body[1:5] == [
        "```bash",
        "make demo   # create .venv if missing, install, run the offline demo",
        "make test   # same set-up, then the test suite (offline, CPU)",
        "```",
    ], "the README's first block is the two commands"


def test_the_readme_links_resolve() -> None:
    targets = LINK.findall(README.read_text())
    assert any(t.startswith("docs/") for t in targets), "the README links into the manual"
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor of the README itself
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            missing.append(target)
    assert missing == []


def test_every_results_directory_is_in_the_benchmarks_page() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    results = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_dir())
    assert results
    assert [r for r in results if f"benchmarks/results/{r}/" not in page] == []
