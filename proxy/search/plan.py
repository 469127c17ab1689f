"""From settings to a search that can run: checked once, then run.

`plan_search` makes every check a search needs before anything is paid for (the algorithm
exists, a scorer is there if the algorithm ranks candidates, the prompt and the answer fit the
scorer's context) and returns a `SearchPlan`; `run_plan` runs one. A caller that must refuse a
request before answering (the server, before a stream's 200) plans first and runs later; no
check is made twice and none can be skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.budget import Budget
from proxy.config.base import ConfigError
from proxy.search.base import SearchAlgorithm, drive
from proxy.search.registry import algorithm
from proxy.search.trace import SearchResult, StepCallback
from proxy.types import Conversation, Usage
from proxy.upstreams.base import Upstream
from scorers.base import Scorer, check_room


class SettingTooSmall(ConfigError):
    """A search's own cap (`setting`) cannot pay for even its first step: it would answer nothing."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"search.{setting}: {message}")
        self.setting = setting
        self.detail = message


def mode_name(cfg: Any) -> str:
    """The search's name from its settings (`cbs-w4k4l30`, `bon4`, `base`)."""
    return algorithm(cfg.algorithm).label(cfg)


def needs_scorer(cfg: Any) -> bool:
    return algorithm(cfg.algorithm).needs_scorer(cfg)


def require_scorer(cfg: Any, have_scorer: bool) -> None:
    """A search that ranks candidates needs a scorer: refuse before anything is loaded or paid."""
    if not have_scorer and needs_scorer(cfg):
        raise ConfigError(f"search.{mode_name(cfg)} needs a scorer (it ranks candidates: w*k > 1); "
                          "add a `scorer:` section")


@dataclass(frozen=True)
class SearchPlan:
    """A search that passed every check (make one with `plan_search`)."""

    conversation: Conversation
    settings: Any
    """The SearchConfig."""
    algorithm: type[SearchAlgorithm]
    scorer: Scorer | None
    """The scorer it runs with: None for unscored plain sampling."""

    @property
    def mode(self) -> str:
        return self.algorithm.label(self.settings)

    @property
    def first_step_bound(self) -> Usage:
        return self.algorithm.first_step_bound(self.settings)


def plan_search(conversation: Conversation | str, cfg: Any, scorer: Scorer | None, *,
                score_plain: bool = True) -> SearchPlan:
    """Check a search of `conversation` (a string: a raw completion prompt) with settings `cfg`:
    ConfigError for an unknown algorithm or a missing scorer, ScorerContextError when the prompt
    or `max_new_tokens` cannot fit the scorer's context. A search that needs no scorer is still
    scored when one is given, unless `score_plain` is False."""
    conv = Conversation.completion(conversation) if isinstance(conversation, str) else conversation
    algo = algorithm(cfg.algorithm)
    needed = algo.needs_scorer(cfg)
    if needed and scorer is None:
        require_scorer(cfg, False)
    use = scorer if needed or score_plain else None
    if use is not None:
        check_room(use, conv.scorer_prompt, cfg.max_new_tokens)
    return SearchPlan(conv, cfg, algo, use)


async def run_plan(plan: SearchPlan, upstream: Upstream, *, on_step: StepCallback | None = None,
                   budget: Budget | None = None) -> SearchResult:
    """Run a planned search. With a `budget` (proxy.budget) it stops before a step that could
    exceed it and answers with its best beam, `stopped_by` saying whose budget it was."""
    session = plan.scorer.open(plan.conversation.scorer_prompt) if plan.scorer is not None else None
    try:
        search = plan.algorithm(plan.conversation, upstream, session, plan.settings)
        return await drive(search, plan.mode, budget=budget, on_step=on_step)
    finally:
        if session is not None:
            session.close()


async def search(conversation: Conversation | str, upstream: Upstream, scorer: Scorer | None, cfg: Any, *,
                 on_step: StepCallback | None = None, budget: Budget | None = None) -> SearchResult:
    """Plan and run one search (see `plan_search`, `run_plan`): the upstream renders the
    conversation and each beam's partial answer its own way; the scoring pair sees
    `conversation.scorer_prompt`, rendered by each model's own template."""
    return await run_plan(plan_search(conversation, cfg, scorer), upstream, on_step=on_step, budget=budget)
