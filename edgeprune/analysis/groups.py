"""Dependency groups of structured pruning (LLM-Pruner's coupled structures), per decoder layer.

A group is every parameter slice that must go together for the model to stay well formed:

- query head h: rows h*d..(h+1)*d of q_proj and the same columns of o_proj;
- KV group g: rows g*d..(g+1)*d of k_proj and v_proj, plus all of its query heads (a KV head
  without queries computes nothing; queries without their KV head cannot run). Query heads inside
  a group may go individually only if every kept group keeps the same count: llama.cpp needs
  n_head divisible by n_head_kv (`Plan.validate` enforces it);
- FFN channel c: row c of gate_proj and up_proj, column c of down_proj.

Fused projections (Phi-3: q, k, v rows stacked in qkv_proj; gate rows then up rows in gate_up_proj)
hold the same slices at an offset.

Every group of one kind covers consecutive, equally wide index blocks of the same parameters, so a
kind is described once (`GroupSet`) and reductions over all its groups are vectorised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from edgeprune.families import family_of
from edgeprune.prune.plan import ModelShape, Plan

HEAD, KV_GROUP, CHANNEL = "head", "kv_group", "channel"


@dataclass(frozen=True)
class Part:
    """One parameter's share of every group of a kind: group i owns indices
    [offset + i*block, offset + (i+1)*block) along dim."""

    param: str  # name inside the decoder layer, e.g. "self_attn.q_proj.weight"
    dim: int  # 0: output rows, 1: input columns
    block: int
    offset: int = 0  # where the kind's first group starts (a part of a fused projection)


@dataclass(frozen=True)
class GroupSet:
    kind: str
    count: int
    parts: tuple[Part, ...]

    def slices(self, index: int, prefix: str = "") -> list[tuple[str, int, slice]]:
        """(parameter name, dim, index range) of group `index`; `prefix` e.g. "model.layers.3."."""
        if not 0 <= index < self.count:
            raise IndexError(f"{self.kind} {index} of {self.count}")
        return [(prefix + p.param, p.dim, slice(p.offset + index * p.block, p.offset + (index + 1) * p.block))
                for p in self.parts]

    def reduce(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of each group's entries of `tensors` (per-parameter maps shaped like the weights), [count].

        Parameters absent from `tensors` contribute nothing (e.g. FLAP scores o_proj columns only).
        """
        total = torch.zeros(self.count, dtype=torch.float64)
        for p in self.parts:
            t = tensors.get(p.param)
            if t is None:
                continue
            # A view: [.., count, block, ..] along dim, summed over everything but the group index.
            t = t.narrow(p.dim, p.offset, self.count * p.block).unflatten(p.dim, (self.count, p.block))
            total += t.sum(dim=[d for d in range(t.ndim) if d != p.dim], dtype=torch.float64)
        return total

    def zero(self, params: dict[str, torch.Tensor], index: int) -> None:
        """Zero group `index` in place in `params` (decoder-layer parameter names)."""
        for name, dim, span in self.slices(index):
            if name in params:
                params[name].data.narrow(dim, span.start, span.stop - span.start).zero_()


@dataclass(frozen=True)
class LayerGroups:
    heads: GroupSet
    kv_groups: GroupSet
    channels: GroupSet

    def by_kind(self, kind: str) -> GroupSet:
        return {HEAD: self.heads, KV_GROUP: self.kv_groups, CHANNEL: self.channels}[kind]


def layer_groups(n_head: int, n_head_kv: int, head_dim: int, ffn: int, attention_bias: bool = False,
                 mlp_bias: bool = False, fused: bool = False) -> LayerGroups:
    """The groups of a layer of this shape. Biases, where a config has them, go with their rows
    (o_proj's and down_proj's bias is shared by every group, so belongs to none). `fused`: q/k/v and
    gate/up are single projections (Phi-3)."""
    group_size = n_head // n_head_kv
    if fused:
        qkv, q_rows, kv_rows = "self_attn.qkv_proj.weight", n_head * head_dim, n_head_kv * head_dim
        head_parts = (Part(qkv, 0, head_dim), Part("self_attn.o_proj.weight", 1, head_dim))
        kv_parts = (Part(qkv, 0, head_dim, q_rows), Part(qkv, 0, head_dim, q_rows + kv_rows),
                    *(Part(p.param, p.dim, p.block * group_size) for p in head_parts))
        channel_parts = (Part("mlp.gate_up_proj.weight", 0, 1), Part("mlp.gate_up_proj.weight", 0, 1, ffn),
                         Part("mlp.down_proj.weight", 1, 1))
        return LayerGroups(GroupSet(HEAD, n_head, head_parts), GroupSet(KV_GROUP, n_head_kv, kv_parts),
                           GroupSet(CHANNEL, ffn, channel_parts))
    q_bias = (Part("self_attn.q_proj.bias", 0, head_dim),) if attention_bias else ()
    head_parts = (Part("self_attn.q_proj.weight", 0, head_dim), Part("self_attn.o_proj.weight", 1, head_dim), *q_bias)
    kv_parts = tuple(Part(f"self_attn.{p}_proj.{kind}", 0, head_dim)
                     for p in "kv" for kind in ("weight", "bias") if kind == "weight" or attention_bias)
    kv_parts += tuple(Part(p.param, p.dim, p.block * group_size) for p in head_parts)
    channel_parts = tuple(Part(f"mlp.{p}_proj.{kind}", 0, 1)
                          for p in ("gate", "up") for kind in ("weight", "bias") if kind == "weight" or mlp_bias)
    channel_parts += (Part("mlp.down_proj.weight", 1, 1),)
    return LayerGroups(GroupSet(HEAD, n_head, head_parts), GroupSet(KV_GROUP, n_head_kv, kv_parts),
                       GroupSet(CHANNEL, ffn, channel_parts))


def config_groups(config: Any) -> LayerGroups:
    """The groups of every layer of an unpruned model of this config."""
    shape = ModelShape.from_config(config)
    return layer_groups(shape.n_head, shape.n_head_kv, shape.head_dim, shape.ffn,
                        bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False)),
                        fused=family_of(config).fused_projections)


def module_groups(layer: Any, head_dim: int) -> LayerGroups:
    """The groups of one decoder layer module, from its projections' own shapes (so pruned models
    with per-layer shapes are described as they are)."""
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "qkv_proj"):
        n_head = attn.o_proj.in_features // head_dim
        return layer_groups(n_head, (attn.qkv_proj.out_features // head_dim - n_head) // 2, head_dim,
                            mlp.down_proj.in_features, fused=True)
    return layer_groups(attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim,
                        mlp.gate_proj.out_features, attn.q_proj.bias is not None, mlp.gate_proj.bias is not None)


def dependency_groups(model: Any, layer: int) -> LayerGroups:
    """The groups of `model`'s decoder layer `layer`; `GroupSet.slices(i, f"model.layers.{layer}.")`
    gives a group's parameter slices by their names in the model's state dict."""
    return module_groups(model.model.layers[layer], ModelShape.from_config(model.config).head_dim)


def removal_plan(shape: ModelShape, layer: int, kind: str, indices: tuple[int, ...]) -> Plan:
    """The Plan that removes the given groups of one layer (original indices); validated, so a
    removal GQA cannot express (uneven query heads per kept KV group) raises PlanError."""
    gone = set(indices)
    if kind == CHANNEL:
        plan = Plan(ffn=((layer, tuple(c for c in range(shape.ffn) if c not in gone)),))
    else:
        heads = gone if kind == HEAD else {h for h in range(shape.n_head) if h // shape.group_size in gone}
        plan = Plan(heads=((layer, tuple(h for h in range(shape.n_head) if h not in heads)),))
    plan.validate(shape)
    return plan
