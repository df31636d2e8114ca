"""A thin ONNX graph writer: nodes by op type, constants shared, and weights streamed.

Weights larger than a few kilobytes go to one external data file as they are given, each at a
page-aligned offset (so the runtime can memory-map it) and dropped right after: the protobuf keeps
only their names, shapes and offsets, which is how a model past protobuf's 2 GB limit is written
with one tensor in memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # the default domain's; com.microsoft's contrib ops are version 1
IR_VERSION = 10
MICROSOFT = "com.microsoft"
INLINE_BYTES = 4096  # smaller initializers stay inside the protobuf
ALIGN = 4096


class GraphWriter:
    def __init__(self, data: BinaryIO | None = None, data_name: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._data, self._data_name = data, data_name
        self._names: dict[str, int] = {}
        self._consts: dict[tuple[Any, ...], str] = {}

    def fresh(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           name: str | None = None, **attrs: Any) -> Any:
        """Add a node; its output name (or names, when several)."""
        base = name or op_type
        outs = [self.fresh(f"{base}/out")] if outputs == 1 else (
            outputs if isinstance(outputs, list) else [self.fresh(f"{base}/out{i}") for i in range(outputs)])
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(base), domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer: written to the external data file now if it is large."""
        array = np.ascontiguousarray(array)
        if self._data is None or array.nbytes <= INLINE_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = -(-self._data.tell() // ALIGN) * ALIGN
        self._data.seek(offset)
        self._data.write(array.tobytes())
        tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self._data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        array = np.array(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), array)
        return self._consts[key]

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], graph_name: str,
              metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MICROSOFT, 1)],
                                  producer_name="edgeprune")
        model.ir_version = IR_VERSION
        helper.set_model_props(model, metadata)
        return model


def save(model: onnx.ModelProto, path: Path) -> None:
    """The protobuf alone (external weights are already in their file)."""
    path.write_bytes(model.SerializeToString())


def relocate(model: Path, dst: Path) -> None:
    """Copy `model` and its external data file to `dst` and `dst`.data: the graph names its data
    file in every external tensor, so the copy's graph is rewritten to name the new one."""
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = dst.name + ".data"
    shutil.copyfile(model.with_name(model.name + ".data"), dst.with_name(dst.name + ".data"))
    save(proto, dst)
