"""The search-override flags every command that runs searches offers (`w2s generate`,
`w2s alpaca-eval`), derived from the table of search settings (proxy.config.search), so a
setting, its flag and its config key cannot drift apart."""
from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any

from proxy.config.search import SETTINGS, Setting


def _scalar(t: object) -> Any:
    """What argparse converts a flag's text with: int from `int | None`; a list of ints from
    `list[int]`, written comma-separated (`--sample-schedule 16,4`)."""
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        return _scalar(next(a for a in typing.get_args(t) if a is not type(None)))
    if typing.get_origin(t) is list:
        item = _scalar(typing.get_args(t)[0])
        return lambda text: [item(part) for part in text.split(",")]
    if typing.get_origin(t) is typing.Annotated:
        return _scalar(typing.get_args(t)[0])
    return t


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
