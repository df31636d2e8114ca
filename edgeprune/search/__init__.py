"""The search: which plans to try, in what order, and when a candidate meets the budget."""

from edgeprune.search.budget import Budget
from edgeprune.search.greedy import NOT_MEASURED, Candidate, SearchOutcome, greedy_search
from edgeprune.search.predict import SearchPredictor
from edgeprune.search.space import HeadStructure, SearchRuntime, SearchSpace, State

__all__ = ["NOT_MEASURED", "Budget", "Candidate", "HeadStructure", "SearchOutcome", "SearchPredictor", "SearchRuntime",
           "SearchSpace", "State", "greedy_search"]
