"""Checks the shape of the code base: python scripts/check_structure.py [--root DIR].

Three rules over the modules of proxy/ and scorers/, read with ast (nothing is imported, so a
broken module is still checked, and the check needs only the standard library):

- no import cycles between modules. Every import statement counts, including those inside
  functions (a late import hides a cycle from Python, not from a reader); relative imports are
  resolved, and `from pkg import name` points at pkg.name where that is a module, else at pkg;
- scorers/ imports nothing of proxy/ but proxy.config, proxy.types and proxy.upstreams (the
  remote scorer's transport): scorers are the layer below the proxy;
- no module longer than MAX_LINES lines.

It prints each violation, one per line, and exits 1 if there is any. `--docs` also builds the
manual strictly (`mkdocs build --strict`, which needs the test extra installed), so one command
runs every check of the code base's shape.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("proxy", "scorers")
MAX_LINES = 330
SCORERS_MAY_IMPORT = ("proxy.config", "proxy.types", "proxy.upstreams")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str
    """path:line of the import statement."""


def discover(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the checked packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a `from .x import y` in `module` names."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest checked module that `import name` runs (a.b.c, else a.b, else a)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports(module: str, path: Path, root: Path, modules: dict[str, Path]) -> list[Edge]:
    """Every edge from `module` to another checked module, one per imported target."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    rel = path.relative_to(root).as_posix()
    edges: list[Edge] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            known = _known(target, modules)
            edge = Edge(module, known or "", f"{rel}:{node.lineno}")
            if known is not None and known != module and edge not in edges:
                edges.append(edge)
    return edges


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def shortest_cycle(start: str, graph: dict[str, set[str]], within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & within):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return [start]


def check(root: Path) -> list[str]:
    modules = discover(root)
    problems: list[str] = []
    edges: list[Edge] = []
    for module, path in modules.items():
        try:
            edges += imports(module, path, root, modules)
        except SyntaxError as e:
            problems.append(f"syntax: {path.relative_to(root).as_posix()}:{e.lineno}: {e.msg}")
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            problems.append(f"size: {path.relative_to(root).as_posix()} has {lines} lines (at most {MAX_LINES})")

    graph: dict[str, set[str]] = {m: set() for m in modules}
    where: dict[tuple[str, str], str] = {}
    for e in edges:
        graph[e.source].add(e.target)
        where.setdefault((e.source, e.target), e.where)
    for component in strongly_connected(graph):
        cycle = shortest_cycle(component[0], graph, set(component))
        steps = ", ".join(where[(a, b)] for a, b in zip(cycle, cycle[1:]))
        extra = f" (all of {', '.join(component)} are in one cycle)" if len(component) > len(cycle) - 1 else ""
        problems.append(f"cycle: {' -> '.join(cycle)} [{steps}]{extra}")

    for e in edges:
        if e.source.split(".")[0] != "scorers" or e.target.split(".")[0] != "proxy":
            continue
        if not any(e.target == allowed or e.target.startswith(allowed + ".") for allowed in SCORERS_MAY_IMPORT):
            problems.append(f"layering: {e.where} imports {e.target} (scorers/ may import only "
                            f"{', '.join(SCORERS_MAY_IMPORT)} of proxy/)")
    return problems


def build_docs(root: Path) -> list[str]:
    """The manual built strictly (a broken link or anchor is an error): its errors, if any."""
    with tempfile.TemporaryDirectory() as site:
        done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site], cwd=root,
                              capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    if done.returncode == 0:
        return []
    return [f"docs: {line}" for line in (done.stdout + done.stderr).splitlines() if line.strip()][-20:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root holding proxy/ and scorers/ (default: this checkout)")
    parser.add_argument("--docs", action="store_true", help="also build docs/ with `mkdocs build --strict`")
    args = parser.parse_args(argv)
    problems = check(args.root)
    if args.docs:
        problems += build_docs(args.root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} structure problem(s)")
        return 1
    print(f"structure ok: {len(discover(args.root))} modules in {', '.join(PACKAGES)}; no import cycles, "
          f"scorers/ imports only {', '.join(SCORERS_MAY_IMPORT)} of proxy/, no module over {MAX_LINES} lines"
          + ("; docs build strictly" if args.docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
