"""The search: which plans to try, in what order, and when a candidate meets the budget."""

from edgeprune.search import greedy, pareto  # noqa: F401  (registers the strategies)
from edgeprune.search.budget import Budget
from edgeprune.search.greedy import greedy_search
from edgeprune.search.loop import NOT_MEASURED, STRATEGIES, Candidate, SearchOutcome, run_search
from edgeprune.search.predict import SearchPredictor
from edgeprune.search.space import HeadStructure, SearchRuntime, SearchSpace, State

__all__ = ["NOT_MEASURED", "STRATEGIES", "Budget", "Candidate", "HeadStructure", "SearchOutcome", "SearchPredictor",
           "SearchRuntime", "SearchSpace", "State", "greedy_search", "run_search"]
