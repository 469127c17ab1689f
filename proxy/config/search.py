"""How one search runs: its algorithm's settings and its caps on spend and time."""
from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from proxy.config.base import ConfigError, Strict, format_validation_error


class SearchConfig(Strict):
    """Chunk-level beam search. Best-of-N is w=1, k=N, l=None; plain sampling is w=k=1, l=None."""

    w: int = Field(1, ge=1, description="beam width: beams kept after each step")
    k: int = Field(1, ge=1, description="successors sampled per beam per step")
    l: int | None = Field(None, ge=1, description="chunk length in upstream tokens; None = unbounded")
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    prefer_finished: bool = False
    """Off (the paper's rule): beams are ranked by score alone, survivors and answer alike, and
    finishing counts only through the EOS term of the score. On: a beam that ran out of budget
    unfinished ranks below every finished or growing one, and the answer is the best finished
    beam when there is one (best-of-N then means "best complete answer")."""
    narrow_start: bool = False
    """Off (the paper's reference code): the first step draws W·K chunks from the prompt (one
    request, n = W·K) and keeps the best W, as every later step draws W·K. On: it draws K, so
    with K ≤ W the first selection keeps every first chunk and chooses nothing; it saves
    (W−1)·K first chunks."""
    max_upstream_tokens: int | None = Field(None, ge=1)
    """Tokens (prompt + completion) one search may be billed; None: no cap (proxy.budget)."""
    max_cost_usd: float | None = Field(None, gt=0)
    """US dollars one search may cost at the upstream's prices; None: no cap."""
    deadline_s: float | None = Field(None, gt=0)
    """Seconds one search may take, retries included; then it answers with its best beam so
    far (`stopped_by="deadline"`), and a step still running is cancelled with its upstream calls."""

    @property
    def needs_scorer(self) -> bool:
        return self.w * self.k > 1

    @property
    def mode(self) -> str:
        if not self.needs_scorer and self.l is None:
            return "base"
        if self.w == 1 and self.l is None:
            return f"bon{self.k}"
        narrow = "-narrow" if self.narrow_start and self.w > 1 else ""
        return f"cbs-w{self.w}k{self.k}l{self.l if self.l is not None else 'inf'}{narrow}"

    def fan_out(self, step: int) -> int:
        """Chunks drawn per expanded beam at `step` (1-based): W·K from the prompt at the first
        (the paper's start, one beam standing for W), K after."""
        return self.k if step > 1 or self.narrow_start else self.w * self.k


def require_scorer(search: SearchConfig, have_scorer: bool) -> None:
    """Guided modes rank candidates, which needs a scorer; refuse before anything is loaded."""
    if search.needs_scorer and not have_scorer:
        raise ConfigError(f"search.{search.mode} needs a scorer (w*k > 1); add a `scorer:` section")


def search_with(base: SearchConfig, **overrides: Any) -> SearchConfig:
    """A copy of `base` with overrides, validated, errors naming `search.<field>`."""
    data = base.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "search")) from None
