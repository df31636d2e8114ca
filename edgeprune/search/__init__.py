"""The search: which plans to try, in what order, and when a candidate meets the budget."""

from edgeprune.search.budget import Budget
from edgeprune.search.greedy import Candidate, SearchOutcome, greedy_search
from edgeprune.search.space import HeadStructure, SearchSpace, State

__all__ = ["Budget", "Candidate", "HeadStructure", "SearchOutcome", "SearchSpace", "State", "greedy_search"]
