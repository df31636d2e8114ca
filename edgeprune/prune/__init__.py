"""Plans (what to remove) and applying them to a copy of the reference model."""

from edgeprune.prune.apply import pruned_config, pruned_state_dict
from edgeprune.prune.modules import apply_plan, layer_shapes
from edgeprune.prune.plan import LayerShape, ModelShape, Plan, PlanError

__all__ = [
    "LayerShape", "ModelShape", "Plan", "PlanError", "apply_plan", "layer_shapes", "pruned_config",
    "pruned_state_dict",
]
