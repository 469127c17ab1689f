"""Guided search: the contract every algorithm keeps (base), the algorithms (cbs, and whatever
is registered), what a search leaves behind (trace), and planning then running one (plan).

    result = await search(conversation, upstream, scorer, SearchConfig(w=4, k=4, l=30))
"""
from proxy.search.base import SearchAlgorithm, cut_at_stop, drive
from proxy.search.cbs import ChunkBeamSearch
from proxy.search.plan import SearchPlan, mode_name, needs_scorer, plan_search, require_scorer, run_plan, search
from proxy.search.registry import algorithm, register, unregister
from proxy.search.trace import Candidate, SearchResult, StepCallback, StepTrace, StoppedBy

__all__ = [
    "Candidate", "ChunkBeamSearch", "SearchAlgorithm", "SearchPlan", "SearchResult", "StepCallback", "StepTrace",
    "StoppedBy", "algorithm", "cut_at_stop", "drive", "mode_name",
    "needs_scorer", "plan_search", "register", "require_scorer", "run_plan", "search", "unregister",
]
