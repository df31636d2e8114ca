"""What a plan would cost per token, before it is built: the baseline's GGUF with the plan and a
per-tensor recipe applied on paper.

The model-guided search ranks every plan within its limits by predicted speed, so it cannot
quantize each one to read its traffic (traffic.py). Pruning changes tensors in a known way: a
dropped layer's tensors go, a removed attention sublayer's `attn_*` tensors go, kept query / KV
heads scale the attention projections' rows (and `attn_output`'s input width), kept FFN channels
scale the up / gate rows and `ffn_down`'s input width. The stored type of a tensor is the one the
baseline's quantization chose, but where its input width changes across a multiple of 256 it
follows llama.cpp's shape fallback (K-quants pack 256 columns per block: Q4_K becomes Q5_0, Q6_K
becomes Q8_0, and back when the width becomes a multiple), and a recipe sets narrow tensors and
the output matrix as quantize/recipes.py does. Not modelled: the Q4_K_M mixture's extra bits for
some layers' `attn_v` / `ffn_down` move with the layer numbering (a few percent of those tensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgeprune.gguf_file import K_BLOCK, hparams, read_gguf
from edgeprune.latency.traffic import OUTPUT, TOKEN_EMBD, ModelTraffic, TensorCost, attention_costs
from edgeprune.prune import LayerShape, ModelShape, Plan
from edgeprune.quantize.recipes import Recipe, is_k_mixture

Q = GGMLQuantizationType
# llama.cpp's shape fallback for the K-quants a K mixture uses, and its inverse (what a fallback
# type in the baseline was meant to be).
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q2_K: Q.IQ4_NL, Q.Q3_K: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL}
INTENDED = {Q.Q5_0: Q.Q4_K, Q.Q5_1: Q.Q5_K, Q.Q8_0: Q.Q6_K}

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
# How each role's size follows the kept heads / channels: rows (the output dimension) or the input width.
_ROWS_BY = {"attn_q": "q", "attn_k": "kv", "attn_v": "kv", "attn_qkv": "qkv", "ffn_gate": "ffn", "ffn_up": "ffn"}
_WIDTH_BY = {"attn_output": "q", "ffn_down": "ffn"}


def _attention_role(role: str) -> bool:
    """Tensors that go with a removed attention sublayer."""
    return role.startswith("attn_") or role == "post_attention_norm"


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: input width first
    qtype: GGMLQuantizationType
    cost: TensorCost


def _bytes(elements: int, qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return elements // block * size


class TrafficPlanner:
    """Per-token costs of plans applied to one baseline GGUF (quantized with `quant`, the default recipe)."""

    def __init__(self, path: Path, shape: ModelShape, quant: str) -> None:
        reader = read_gguf(path)
        self.hp, self.shape, self.k_mixture = hparams(reader), shape, is_k_mixture(quant)
        self.file_bytes = Path(path).stat().st_size
        self.tensors = [_Tensor(t.name, tuple(int(x) for x in t.shape), t.tensor_type, TensorCost.of(t))
                        for t in reader.tensors]
        self.output = OUTPUT if any(t.name == OUTPUT for t in self.tensors) else TOKEN_EMBD

    def planned_type(self, t: _Tensor, width: int, recipe: Recipe) -> GGMLQuantizationType:
        """The type the quantizer would store `t` in at input width `width` under `recipe`."""
        if len(t.shape) < 2:
            return t.qtype  # norms and biases stay F32
        if t.name == self.output and recipe.output is not None:
            return Q[recipe.output]
        if not self.k_mixture:
            return t.qtype  # Q8_0, F16...: blocks that fit any width
        was_narrow = t.shape[0] % K_BLOCK != 0
        intended = INTENDED.get(t.qtype, t.qtype) if was_narrow else t.qtype
        if width % K_BLOCK == 0:
            return intended
        keep = recipe.keep is not None and re.search(recipe.keep, t.name)
        if recipe.narrow is not None and not keep and t.name not in (self.output, TOKEN_EMBD):
            return Q[recipe.narrow]
        return FALLBACK.get(intended, intended)

    def tensor_costs(self, plan: Plan, recipe: Recipe) -> list[TensorCost]:
        """The pruned model's tensors, as the baseline's with `plan` and `recipe` applied."""
        shape, kept = self.shape, plan.kept_layers(self.shape)
        layers = {old: plan.layer_shape(old, shape) for old in kept}
        costs = []
        for t in self.tensors:
            m = _LAYER_TENSOR.match(t.name)
            if m is None:  # embeddings, output, final norm, RoPE factors
                costs.append(TensorCost(t.name, t.cost.elements, _bytes(t.cost.elements, self.planned_type(
                    t, t.shape[0], recipe)), t.cost.rows, t.cost.matmul))
                continue
            old, role = int(m.group(1)), m.group(2)
            layer = layers.get(old)
            if layer is None or (not layer.has_attention and _attention_role(role)):
                continue
            ratio = {"q": layer.n_head / shape.n_head, "kv": layer.n_head_kv / shape.n_head_kv,
                     "qkv": (layer.n_head + 2 * layer.n_head_kv) / (shape.n_head + 2 * shape.n_head_kv),
                     "ffn": layer.ffn / shape.ffn}
            scale = ratio.get(_ROWS_BY.get(role) or _WIDTH_BY.get(role, ""), 1.0)
            width = round(t.shape[0] * scale) if role in _WIDTH_BY else t.shape[0]
            elements = round(t.cost.elements * scale)
            qtype = self.planned_type(t, width, recipe)
            name = f"blk.{kept.index(old)}.{role}.{m.group(3)}"
            costs.append(TensorCost(name, elements, _bytes(elements, qtype), t.cost.rows, t.cost.matmul))
        return costs

    def traffic(self, plan: Plan, recipe: Recipe, name: str, runtime: str = "llama.cpp") -> ModelTraffic:
        """The plan's per-token costs (llama.cpp's GGUF accounting, whichever runtime runs it)."""
        costs = self.tensor_costs(plan, recipe)
        layers: list[LayerShape] = plan.layer_shapes(self.shape)
        kv_bytes, attn_flops = attention_costs([s.n_head for s in layers], [s.n_head_kv for s in layers],
                                               self.hp.head_dim, self.hp.value_dim)
        file_bytes = self.file_bytes - sum(t.cost.n_bytes for t in self.tensors) + sum(c.n_bytes for c in costs)
        return ModelTraffic.of_tensors(name, costs, kv_bytes, attn_flops, file_bytes, runtime)
