"""The optional parts of the install, and the one error a missing part raises.

`pip install w2s-proxy` is the core: the proxy in plain mode (no guide), no torch. The rest are
extras; pyproject.toml's [project.optional-dependencies] lists their packages (the one source of
that list), this module only names them and what each serves:

    remote  scorer.kind remote: the guide on logprob engines (tokenizers and templates, no torch)
    local   scorer.kind implicit (the guide in-process) and `w2s serve-local`: torch, transformers
    demo    `w2s demo`: local + the demo's lexicon judges
    tune    `w2s tune`: demo + trl, peft
    bench   benchmarks/: demo + matplotlib
    otel    OpenTelemetry export of spans (`w2s serve --otel`): the API, the SDK, the OTLP/HTTP exporter

Here, not in proxy/, so that scorers/ (which may import proxy.config) raises the same error.
"""
from __future__ import annotations

import importlib.util

from proxy.config.base import ConfigError

EXTRAS = {
    "remote": "a remote scorer (scorer.kind remote)",
    "local": "the in-process guide (scorer.kind implicit) and `w2s serve-local`",
    "demo": "`w2s demo`",
    "tune": "`w2s tune`",
    "bench": "the benchmarks",
    "otel": "OpenTelemetry export (`w2s serve --otel`)",
}


class MissingExtra(ConfigError, ImportError):
    """A module an extra installs is absent: the message names the extra and the pip command.
    A ConfigError (the CLI prints it and exits 2) and an ImportError (what a caller would expect
    from a missing module)."""

    def __init__(self, extra: str, module: str, use: str | None = None) -> None:
        self.extra = extra
        self.module = module
        what = use or EXTRAS.get(extra, f"the {extra} extra")
        super().__init__(f"{what} needs the w2s-proxy[{extra}] extra ({module} is not installed): "
                         f"pip install 'w2s-proxy[{extra}]'")
        self.name = module


def require(extra: str, *modules: str, use: str | None = None) -> None:
    """Raise MissingExtra naming `extra` unless every one of `modules` can be imported. Only looks
    (importlib.util.find_spec): imports nothing, so it costs no torch start-up."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-removed install counts as absent
            found = False
        if not found:
            raise MissingExtra(extra, module, use)


SCORER_EXTRAS = {"implicit": ("local", ("torch", "transformers")), "remote": ("remote", ("transformers", "jinja2"))}
"""scorer.kind -> the extra it needs and the modules that extra brings."""


def require_scorer_extra(kind: str) -> None:
    """MissingExtra unless the extra that scorer.kind `kind` needs is installed (an unknown kind
    passes: scorers.registry names it)."""
    if kind in SCORER_EXTRAS:
        extra, modules = SCORER_EXTRAS[kind]
        require(extra, *modules, use=f"scorer.kind {kind}")
