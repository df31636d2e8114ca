"""A Plan is plain data: which layers to drop, and what each kept layer keeps.

Per kept layer a plan may keep a subset of query heads (their KV heads follow) and a subset of
FFN channels; an empty subset removes that sublayer. Plans are frozen and hashable, serialise to
JSON, and name candidates in the cache and reports. Indices always refer to the *original* model,
so a plan reads the same whatever else it drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.families import family_of
from edgeprune.hashing import sha256_json


class PlanError(EdgepruneError):
    """A plan that the model or the runtime cannot express."""


@dataclass(frozen=True)
class ModelShape:
    """The original (unpruned, uniform) shape of a model, and whether llama.cpp can give its layers
    different shapes (`per_layer`: its family has a per-layer architecture)."""

    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    family: str = "llama"
    per_layer: bool = True
    head_pruning: bool = True  # False: llama.cpp runs the family's models with every query head

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        family = family_of(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            family=family.name,
            per_layer=family.per_layer_arch is not None,
            head_pruning=family.head_pruning,
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
class LayerShape:
    """What one kept layer computes; 0 heads = attention removed, ffn 0 = MLP removed."""

    n_head: int
    n_head_kv: int
    ffn: int

    @property
    def has_attention(self) -> bool:
        return self.n_head > 0

    @property
    def has_mlp(self) -> bool:
        return self.ffn > 0


def _encode_channels(channels: tuple[int, ...]) -> str:
    """FFN channel sets are long (thousands per layer): a hex bitmask keeps plans and GGUF metadata small."""
    if not channels:
        return ""
    bits = bytearray(max(channels) // 8 + 1)  # set bit by bit: summing 1 << c is quadratic in the width
    for c in channels:
        bits[c >> 3] |= 1 << (c & 7)
    return format(int.from_bytes(bits, "little"), "x")


def _decode_channels(mask: str) -> tuple[int, ...]:
    low_first = bin(int(mask, 16))[:1:-1] if mask else ""
    return tuple(i for i, bit in enumerate(low_first) if bit == "1")


def _normalise(entries: Any) -> tuple[tuple[int, tuple[int, ...]], ...]:
    return tuple(sorted((int(layer), tuple(sorted(map(int, kept)))) for layer, kept in entries))


@dataclass(frozen=True)
class Plan:
    drop_layers: tuple[int, ...] = ()
    # (original layer, kept query heads); () removes the layer's attention.
    heads: tuple[tuple[int, tuple[int, ...]], ...] = field(default=())
    # (original layer, kept FFN channels); () removes the layer's MLP.
    ffn: tuple[tuple[int, tuple[int, ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        heads, ffn = _normalise(self.heads), _normalise(self.ffn)
        # A layer without attention and without MLP is the identity: that is dropping it.
        emptied = {l for l, h in heads if not h} & {l for l, c in ffn if not c}
        object.__setattr__(self, "drop_layers", tuple(sorted({*self.drop_layers, *emptied})))
        object.__setattr__(self, "heads", tuple(e for e in heads if e[0] not in emptied))
        object.__setattr__(self, "ffn", tuple(e for e in ffn if e[0] not in emptied))

    # -- identity -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"drop_layers": list(self.drop_layers), "heads": {str(l): list(h) for l, h in self.heads}}
        if self.ffn:  # omitted when unused, so plans without FFN pruning keep their keys
            out["ffn"] = {str(l): _encode_channels(c) for l, c in self.ffn}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            drop_layers=tuple(data.get("drop_layers", ())),
            heads=tuple((int(l), tuple(h)) for l, h in data.get("heads", {}).items()),
            ffn=tuple((int(l), _decode_channels(m)) for l, m in data.get("ffn", {}).items()),
        )

    def key(self) -> str:
        return sha256_json(self.to_dict())[:16]

    @property
    def is_identity(self) -> bool:
        return not self.drop_layers and not self.heads and not self.ffn

    # -- structure ----------------------------------------------------------------------------
    def kept_layers(self, shape: ModelShape) -> list[int]:
        return [i for i in range(shape.n_layers) if i not in set(self.drop_layers)]

    def kept_heads(self, layer: int, shape: ModelShape) -> tuple[int, ...]:
        return dict(self.heads).get(layer, tuple(range(shape.n_head)))

    def kept_kv_heads(self, layer: int, shape: ModelShape) -> tuple[int, ...]:
        return tuple(sorted({h // shape.group_size for h in self.kept_heads(layer, shape)}))

    def kept_channels(self, layer: int, shape: ModelShape) -> tuple[int, ...]:
        return dict(self.ffn).get(layer, tuple(range(shape.ffn)))

    def layer_shape(self, layer: int, shape: ModelShape) -> LayerShape:
        return LayerShape(
            n_head=len(self.kept_heads(layer, shape)),
            n_head_kv=len(self.kept_kv_heads(layer, shape)),
            ffn=len(self.kept_channels(layer, shape)),
        )

    def layer_shapes(self, shape: ModelShape) -> list[LayerShape]:
        """The shape of every kept layer, in order."""
        return [self.layer_shape(l, shape) for l in self.kept_layers(shape)]

    def uniform_shape(self, shape: ModelShape) -> LayerShape | None:
        """The one shape all kept layers share, if they do and keep both sublayers; else None."""
        shapes = set(self.layer_shapes(shape))
        if len(shapes) != 1:
            return None
        only = shapes.pop()
        return only if only.has_attention and only.has_mlp else None

    def validate(self, shape: ModelShape) -> None:
        """Reject, before any work, a plan the model or llama.cpp cannot express."""
        bad = [i for i in self.drop_layers if not 0 <= i < shape.n_layers]
        if bad:
            raise PlanError(f"Plan drops layers {list(self.drop_layers)}, but the model has {shape.n_layers}.")
        if len(self.drop_layers) >= shape.n_layers:
            raise PlanError("Plan drops every layer; keep at least one.")
        for what, entries in (("heads", self.heads), ("FFN channels", self.ffn)):
            for layer, _ in entries:
                if layer in self.drop_layers or not 0 <= layer < shape.n_layers:
                    raise PlanError(f"Plan prunes the {what} of layer {layer}, which is dropped or does not exist.")
        for layer, heads in self.heads:
            self._check_heads(layer, heads, shape)
        for layer, channels in self.ffn:
            if len(set(channels)) != len(channels) or not all(0 <= c < shape.ffn for c in channels):
                raise PlanError(f"Plan keeps FFN channels that repeat or exceed {shape.ffn - 1} in layer {layer}.")
        if not shape.head_pruning and any(heads and len(heads) < shape.n_head for _, heads in self.heads):
            raise PlanError(
                f"Plan removes query heads, but llama.cpp's {shape.family} graph needs every query head (it sizes "
                "the attention by the hidden width); prune layers or FFN channels instead."
            )
        if not shape.per_layer and self.uniform_shape(shape) is None:
            raise PlanError(
                f"Plan gives layers different shapes ({self.describe(shape)}), but llama.cpp runs {shape.family} "
                "models with one shape for every layer; prune every layer alike, or drop whole layers."
            )
        first = self.kept_layers(shape)[0]
        if not self.layer_shape(first, shape).has_attention:
            # llama.cpp's deci graph sizes the KV cache from layer 0.
            raise PlanError(
                f"Plan removes the attention of layer {first}, the first kept layer; llama.cpp needs the first "
                "layer to keep attention (drop the whole layer instead)."
            )

    @staticmethod
    def _check_heads(layer: int, heads: tuple[int, ...], shape: ModelShape) -> None:
        if len(set(heads)) != len(heads) or not all(0 <= h < shape.n_head for h in heads):
            raise PlanError(f"Plan keeps heads {list(heads)} in layer {layer}; the model has {shape.n_head}.")
        per_group: dict[int, int] = {}
        for h in heads:
            per_group[h // shape.group_size] = per_group.get(h // shape.group_size, 0) + 1
        if len(set(per_group.values())) > 1:
            raise PlanError(
                f"Plan keeps an uneven number of query heads per KV group in layer {layer} "
                f"({per_group}); grouped-query attention needs the same number in every kept group."
            )

    def describe(self, shape: ModelShape) -> str:
        if self.is_identity:
            return "unpruned"
        parts = []
        if self.drop_layers:
            parts.append(f"drop {len(self.drop_layers)}/{shape.n_layers} layers {list(self.drop_layers)}")
        shapes = self.layer_shapes(shape)
        uniform = self.uniform_shape(shape)
        if uniform is not None:
            if self.heads:
                parts.append(f"keep {uniform.n_head}/{shape.n_head} heads ({uniform.n_head_kv}/{shape.n_head_kv} KV) "
                             "per layer")
            if self.ffn:
                parts.append(f"FFN {uniform.ffn}/{shape.ffn} per layer")
            return "; ".join(parts)
        no_attn = sum(not s.has_attention for s in shapes)
        no_mlp = sum(not s.has_mlp for s in shapes)
        heads = sorted({s.n_head for s in shapes if s.has_attention})
        widths = sorted({s.ffn for s in shapes if s.has_mlp})
        if len(heads) > 1 or (self.heads and heads and heads[0] != shape.n_head):
            parts.append(f"heads {_span(heads)}/{shape.n_head} per layer")
        if len(widths) > 1 or (self.ffn and widths and widths[0] != shape.ffn):
            parts.append(f"FFN {_span(widths)}/{shape.ffn} per layer")
        if no_attn:
            parts.append(f"attention removed in {no_attn} layer{'s' * (no_attn > 1)}")
        if no_mlp:
            parts.append(f"MLP removed in {no_mlp} layer{'s' * (no_mlp > 1)}")
        return "; ".join(parts)


def _span(values: list[int]) -> str:
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}–{values[-1]}"
