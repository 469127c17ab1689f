"""Search algorithms by name: the `algorithm` setting picks one from here.

Adding an algorithm is one module (a `proxy.search.base.SearchAlgorithm`) and one line in
`_ALGORITHMS`; code outside the project (a plug-in, a test) calls `register` instead. Every
other part (the config's `algorithm` setting, the server's modes and `w2s.algorithm`, the CLI's
`--algorithm`, streaming, budgets) finds it through `algorithm()`.
"""
from __future__ import annotations

from proxy.config.base import ConfigError
from proxy.search.base import SearchAlgorithm
from proxy.search.cbs import ChunkBeamSearch

_ALGORITHMS: dict[str, type[SearchAlgorithm]] = {"cbs": ChunkBeamSearch}


def register(name: str, cls: type[SearchAlgorithm]) -> None:
    """Make `cls` the algorithm called `name`; a name already taken by another class is refused."""
    if _ALGORITHMS.get(name, cls) is not cls:
        raise ValueError(f"search algorithm {name!r} is already registered")
    _ALGORITHMS[name] = cls


def unregister(name: str) -> None:
    _ALGORITHMS.pop(name, None)


def names() -> list[str]:
    return sorted(_ALGORITHMS)


def algorithm(name: str) -> type[SearchAlgorithm]:
    """The algorithm called `name`; ConfigError naming the setting and the known ones."""
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"search.algorithm: unknown algorithm {name!r} (known: {', '.join(names())})") from None
