"""Run the reference over calibration tokens once and score every layer and head."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from edgeprune.analysis.scores import block_influence, channel_output_norms, head_output_norms
from edgeprune.progress import progress

log = logging.getLogger(__name__)


@dataclass
class Importance:
    layer_scores: list[float]  # Block Influence per layer; low = the layer changes little
    head_scores: list[list[float]]  # per layer, per query head: mean output norm
    channel_scores: list[list[float]]  # per layer, per FFN channel: mean output norm

    def to_dict(self) -> dict[str, Any]:
        return {"layer_block_influence": self.layer_scores, "head_output_norm": self.head_scores,
                "ffn_channel_output_norm": self.channel_scores}

    def summary(self) -> dict[str, Any]:
        """What reports show: per-layer scores (the per-channel lists run to thousands per layer)."""
        return {"layer_block_influence": self.layer_scores, "head_output_norm": self.head_scores}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Importance:
        return cls(data["layer_block_influence"], data["head_output_norm"], data["ffn_channel_output_norm"])

    def layers_by_importance(self, protect: tuple[int, ...] = ()) -> list[int]:
        """Layer indices, least important first, excluding `protect`."""
        order = sorted(range(len(self.layer_scores)), key=lambda i: (self.layer_scores[i], i))
        return [i for i in order if i not in protect]


@torch.no_grad()
def compute_importance(model: Any, tokens: torch.Tensor, batch_size: int = 4) -> Importance:
    layers = model.model.layers
    head_dim = model.config.head_dim
    n = len(layers)
    bi_sum = torch.zeros(n, dtype=torch.float64)
    head_sum = torch.zeros(n, model.config.num_attention_heads, dtype=torch.float64)
    channel_sum = torch.zeros(n, model.config.intermediate_size, dtype=torch.float64)
    count = 0
    hooks = []

    def layer_hook(i: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            bi_sum[i] += block_influence(h_in, h_out).sum()

        return hook

    def o_proj_hook(i: int):
        def hook(module, args):
            head_sum[i] += head_output_norms(module.weight, args[0], head_dim).sum(dim=0)

        return hook

    def down_proj_hook(i: int):
        def hook(module, args):
            channel_sum[i] += channel_output_norms(module.weight, args[0]).sum(dim=0)

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(o_proj_hook(i)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(down_proj_hook(i)))
    try:
        for start in progress(range(0, len(tokens), batch_size), "importance"):
            batch = tokens[start : start + batch_size]
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return Importance(
        layer_scores=(bi_sum / count).tolist(),
        head_scores=(head_sum / count).tolist(),
        channel_scores=(channel_sum / count).tolist(),
    )
