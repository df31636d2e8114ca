"""A Plan is plain data: which layers to drop and which query heads each kept layer keeps.

Plans are frozen and hashable, serialise to JSON, and name candidates in the cache and reports.
Indices always refer to the *original* model, so a plan reads the same whatever else it drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_json


class PlanError(EdgepruneError):
    """A plan that the model or the runtime cannot express."""


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            n_layers=config.num_hidden_layers,
            n_head=config.num_attention_heads,
            n_head_kv=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            hidden=config.hidden_size,
            ffn=config.intermediate_size,
            vocab=config.vocab_size,
        )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_head_kv


@dataclass(frozen=True)
class Plan:
    drop_layers: tuple[int, ...] = ()
    # (original layer, kept query heads) for each kept layer whose heads are pruned.
    heads: tuple[tuple[int, tuple[int, ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop_layers", tuple(sorted(self.drop_layers)))
        object.__setattr__(self, "heads", tuple(sorted((int(l), tuple(sorted(h))) for l, h in self.heads)))

    # -- identity -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"drop_layers": list(self.drop_layers), "heads": {str(l): list(h) for l, h in self.heads}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            drop_layers=tuple(data.get("drop_layers", ())),
            heads=tuple((int(l), tuple(h)) for l, h in data.get("heads", {}).items()),
        )

    def key(self) -> str:
        return sha256_json(self.to_dict())[:16]

    @property
    def is_identity(self) -> bool:
        return not self.drop_layers and not self.heads

    # -- structure ----------------------------------------------------------------------------
    def kept_layers(self, shape: ModelShape) -> list[int]:
        return [i for i in range(shape.n_layers) if i not in set(self.drop_layers)]

    def kept_heads(self, layer: int, shape: ModelShape) -> tuple[int, ...]:
        return dict(self.heads).get(layer, tuple(range(shape.n_head)))

    def kept_kv_heads(self, layer: int, shape: ModelShape) -> tuple[int, ...]:
        return tuple(sorted({h // shape.group_size for h in self.kept_heads(layer, shape)}))

    def layer_heads(self, shape: ModelShape) -> tuple[int, int]:
        """(query heads, KV heads) of every kept layer; the llama architecture needs one pair."""
        pairs = {(len(self.kept_heads(l, shape)), len(self.kept_kv_heads(l, shape))) for l in self.kept_layers(shape)}
        if len(pairs) != 1:
            raise PlanError(
                f"The plan keeps different head counts per layer ({sorted(pairs)}); "
                "the llama GGUF architecture needs one head count for all layers."
            )
        return pairs.pop()

    def validate(self, shape: ModelShape) -> None:
        """Reject, before any work, a plan the model or the runtime cannot express."""
        bad = [i for i in self.drop_layers if not 0 <= i < shape.n_layers]
        if bad or len(set(self.drop_layers)) != len(self.drop_layers):
            raise PlanError(f"Plan drops layers {list(self.drop_layers)}, but the model has {shape.n_layers}.")
        if len(self.drop_layers) >= shape.n_layers:
            raise PlanError("Plan drops every layer; keep at least one.")
        for layer, heads in self.heads:
            if layer in self.drop_layers or not 0 <= layer < shape.n_layers:
                raise PlanError(f"Plan prunes heads of layer {layer}, which is dropped or does not exist.")
            if not heads or len(set(heads)) != len(heads) or not all(0 <= h < shape.n_head for h in heads):
                raise PlanError(f"Plan keeps heads {list(heads)} in layer {layer}; the model has {shape.n_head}.")
            per_group: dict[int, int] = {}
            for h in heads:
                per_group[h // shape.group_size] = per_group.get(h // shape.group_size, 0) + 1
            if len(set(per_group.values())) != 1:
                raise PlanError(
                    f"Plan keeps an uneven number of query heads per KV group in layer {layer} "
                    f"({per_group}); grouped-query attention needs the same number in every kept group."
                )
        self.layer_heads(shape)

    def describe(self, shape: ModelShape) -> str:
        if self.is_identity:
            return "unpruned"
        parts = []
        if self.drop_layers:
            parts.append(f"drop {len(self.drop_layers)}/{shape.n_layers} layers {list(self.drop_layers)}")
        if self.heads:
            q, kv = self.layer_heads(shape)
            parts.append(f"keep {q}/{shape.n_head} heads ({kv}/{shape.n_head_kv} KV) per layer")
        return "; ".join(parts)
