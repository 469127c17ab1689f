"""The search-override flags every command that runs searches offers (`w2s generate`,
`w2s alpaca-eval`), derived from the table of search settings (proxy.config.search), so a
setting, its flag and its config key cannot drift apart."""
from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable

from proxy.config.search import SETTINGS, Setting


def _scalar(t: object) -> type:
    """int from `int | None`: what argparse converts a flag's text to."""
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        return next(a for a in typing.get_args(t) if a is not type(None))
    return t  # type: ignore[return-value]


def _flagged(settings: Iterable[Setting] | None) -> list[Setting]:
    return [s for s in (SETTINGS if settings is None else settings) if s.cli]


def add_search_flags(p: argparse.ArgumentParser, settings: Iterable[Setting] | None = None) -> None:
    g = p.add_argument_group("search overrides")
    for s in _flagged(settings):
        kind = _scalar(s.type)
        if kind is bool:  # a switch that turns on what is off by default
            g.add_argument(s.cli_flag, dest=s.name, action="store_const", const=True, default=None, help=s.help)
        else:
            g.add_argument(s.cli_flag, dest=s.name, type=kind, default=None, help=s.help,
                           metavar=s.name.upper() if s.flag else None)


def search_overrides(args: argparse.Namespace, settings: Iterable[Setting] | None = None) -> dict[str, object]:
    """The search fields the command line set, as `load_config` overrides."""
    return {s.name: getattr(args, s.name) for s in _flagged(settings) if getattr(args, s.name, None) is not None}
