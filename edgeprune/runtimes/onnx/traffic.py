"""What one token costs an edgeprune ONNX decoder, read from its graph (weights stay on disk): the
same accounting as the GGUF's (latency/traffic.py). Every matrix is read once per decoded token
(MatMul, Gemm, MatMulNBits with its scales and zero points), one embedding row is gathered, and
GroupQueryAttention reads an fp32 K and V per cached position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edgeprune.latency.traffic import ModelTraffic
from edgeprune.runtimes.onnx.io_names import PAST

KV_BYTES = 4  # the graph's cache is fp32
HEADS = ("lm_head.", "model.embed_tokens.")  # node names of the output head (a tied one is named for the table)


def _bytes(t: onnx.TensorProto) -> int:
    external = {e.key: e.value for e in t.external_data}
    if "length" in external:
        return int(external["length"])
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(int(a.i) for a in node.attribute if a.name == name)


def onnx_traffic(path: Path) -> ModelTraffic:
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    sizes = {t.name: _bytes(t) for t in graph.initializer}
    dims = {t.name: tuple(int(d) for d in t.dims) for t in graph.initializer}
    weight_bytes = flops = output_flops = parameters = 0
    gathered: set[str] = set()
    counted: set[str] = set()
    cache_dims = {i.name: (i.type.tensor_type.shape.dim[1].dim_value, i.type.tensor_type.shape.dim[3].dim_value)
                  for i in graph.input if i.name.startswith(PAST)}
    kv_bytes = sum(heads * dim * KV_BYTES for heads, dim in cache_dims.values())
    attention_flops = 0
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in sizes:
            table = node.input[0]
            gathered.add(table)
            weight_bytes += sizes[table] // dims[table][0]  # one row per token
        elif node.op_type == "MatMulNBits":
            n, k = _attr(node, "N"), _attr(node, "K")
            weight_bytes += sum(sizes.get(name, 0) for name in node.input[1:])
            flops += 2 * n * k
            parameters += n * k
            counted.update(node.input[1:])
            if node.name.startswith(HEADS):
                output_flops = 2 * n * k
        elif node.op_type in ("MatMul", "Gemm") and node.input[1] in sizes:
            weight = node.input[1]
            rows, cols = dims[weight]
            weight_bytes += sizes[weight]  # a tied head reads the whole table, like llama.cpp's
            flops += 2 * rows * cols
            if weight not in counted:
                parameters += rows * cols
            counted.add(weight)
            if node.op_type == "Gemm":
                output_flops = 2 * rows * cols
        elif node.op_type == "GroupQueryAttention":
            heads = _attr(node, "num_heads")
            dim = next(d for _, d in cache_dims.values())
            attention_flops += 2 * heads * 2 * dim  # q.k, then p.v, per head
        elif node.op_type == "SimplifiedLayerNormalization":
            weight_bytes += sizes.get(node.input[1], 0)
    parameters += sum(int(np.prod(dims[t])) for t in gathered if t not in counted)
    parameters += sum(int(np.prod(dims[n.input[1]])) for n in graph.node
                      if n.op_type == "SimplifiedLayerNormalization")
    data = path.with_name(path.name + ".data")
    return ModelTraffic(
        name=path.name,
        weight_bytes_per_token=weight_bytes,
        flops_per_token=flops,
        output_flops=output_flops,
        kv_bytes_per_position=kv_bytes,
        attention_flops_per_position=attention_flops,
        parameters=parameters,
        file_bytes=path.stat().st_size + (data.stat().st_size if data.exists() else 0),
        tied=not any(t.startswith("lm_head") for t in sizes),
        runtime="onnxruntime",
    )
