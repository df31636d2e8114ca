"""Plans (what to remove) and applying them to a copy of the reference model."""

from edgeprune.prune.apply import apply_plan, pruned_config, pruned_state_dict
from edgeprune.prune.plan import ModelShape, Plan, PlanError

__all__ = ["ModelShape", "Plan", "PlanError", "apply_plan", "pruned_config", "pruned_state_dict"]
