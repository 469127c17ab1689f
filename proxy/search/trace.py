"""What a search leaves behind: its tree of candidates, one trace per step, and the result.

Every algorithm (proxy.search.base) records the same kinds of node and step, so the server's
streaming and metrics, the trace page and the benchmarks read any algorithm's search alike.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.types import Usage

StoppedBy = Literal["budget", "shared budget", "deadline"]
"""Why a search ended before its beams did: its own cap (`budget`), a budget it shares with
others, an API key's or a run's (`shared budget`), or `deadline_s` (`deadline`)."""


@dataclass
class Candidate:
    """One node of the search tree: a whole response so far."""

    id: int
    parent: int | None
    step: int
    chunk: str
    """Text this node added to its parent."""
    text: str
    tokens: int
    """Upstream tokens in `text`."""
    finished: bool
    score: float | None = None
    finish_reason: str | None = None
    survived: bool = False
    stalled: bool = False
    """The upstream returned nothing new without finishing (e.g. context window full)."""


@dataclass
class StepTrace:
    step: int
    expanded: list[int]
    """Ids of the beams expanded in this step."""
    candidates: list[Candidate]
    """New candidates of this step, in beam order then sample order."""
    carried: list[int]
    """Ids of earlier beams that took part in the selection without being expanded."""
    survivors: list[int]
    """Ids kept, best first."""
    usage: Usage
    calls: int
    upstream_s: float
    """Slowest upstream request of the step."""
    scoring_s: float
    """Scoring time summed over the step's requests."""
    wall_s: float


@dataclass
class SearchResult:
    text: str
    score: float | None
    finished: bool
    tokens: int
    config: Any
    """The SearchConfig it ran with."""
    mode: str = ""
    """The search's name from its settings (`cbs-w4k4l30`, `bon4`, `base`): proxy.search.mode_name."""
    steps: list[StepTrace] = field(default_factory=list)
    usage: Usage = Usage()
    calls: int = 0
    wall_s: float = 0.0
    chosen: int = 0
    nodes: dict[int, Candidate] = field(default_factory=dict)
    stopped_by: StoppedBy | None = None
    """None when the search ran its course."""

    @property
    def path(self) -> list[int]:
        """Ids from the first chunk to the chosen node."""
        out: list[int] = []
        node: int | None = self.chosen
        while node is not None and node != 0:
            out.append(node)
            node = self.nodes[node].parent
        return out[::-1]


StepCallback = Callable[[StepTrace, list[Candidate]], Awaitable[None] | None]
"""Called after every step with its trace and the survivors, best first."""
