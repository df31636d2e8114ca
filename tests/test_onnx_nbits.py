"""MatMulNBits weights packed by edgeprune are the bytes onnxruntime's own packer writes, and a
MatMulNBits node computes with exactly the weights `unpack` returns."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgeprune.runtimes.onnx import nbits
from edgeprune.runtimes.onnx.graph import IR_VERSION, MICROSOFT, OPSET

CASES = [(bits, block, symmetric) for bits in nbits.BITS for block in (32, 128) for symmetric in (False, True)]


def weight(n: int = 48, k: int = 200, seed: int = 0) -> np.ndarray:
    """K not a multiple of either block size; a zero row, a constant row and a large outlier."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    w[3] = 0.0
    w[5] = 0.02
    w[7, 11] = 1.5
    return w


def onnxruntime_pack(w: np.ndarray, bits: int, block: int, symmetric: bool) -> nbits.Packed:
    """The same weight packed by onnxruntime's C++ routine (what its MatMulNBitsQuantizer calls)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    k_blocks = -(-k // block)
    b = np.zeros((k_blocks * block, n), np.float32)  # it reads MatMul's (K, N) layout
    b[:k] = w.T
    packed = np.zeros((n, k_blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(
        packed, b, scales, zero_points, block, n, k_blocks * block, symmetric)
    return nbits.Packed(packed, scales, None if symmetric else zero_points, k, bits, block)


@pytest.mark.parametrize(("bits", "block", "symmetric"), CASES)
def test_packing_is_onnxruntimes_byte_for_byte(bits, block, symmetric):
    w = weight()
    ours, theirs = nbits.pack(w, bits, block, symmetric), onnxruntime_pack(w, bits, block, symmetric)
    assert np.array_equal(ours.weight, theirs.weight)
    np.testing.assert_array_equal(ours.scales, theirs.scales)
    if symmetric:
        assert ours.zero_points is None
    else:
        assert np.array_equal(ours.zero_points, theirs.zero_points)


@pytest.mark.parametrize(("bits", "block", "symmetric"), CASES)
def test_unpacked_weights_are_within_a_step_of_the_original(bits, block, symmetric):
    w = weight()
    p = nbits.pack(w, bits, block, symmetric)
    step = np.repeat(p.scales, block, axis=1)[:, : w.shape[1]]
    error = np.abs(nbits.unpack(p) - w)
    # Half a step asymmetric; symmetric grids are one level short on the positive side, so the
    # largest positive value can clip by up to a step.
    assert (error <= (0.5 if not symmetric else 1.0) * np.abs(step) + 1e-7).all()
    assert np.array_equal(nbits.unpack(p)[3], np.zeros(w.shape[1], np.float32))


@pytest.mark.parametrize(("bits", "block", "symmetric"), CASES)
def test_a_matmulnbits_node_computes_with_the_unpacked_weights(bits, block, symmetric):
    import onnxruntime as ort

    w = weight()
    p = nbits.pack(w, bits, block, symmetric)
    inputs = ["A", "B", "scales"] + ([] if symmetric else ["zero_points"])
    inits = [helper.make_tensor("B", TensorProto.UINT8, p.weight.shape, p.weight.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, p.scales.shape, p.scales.ravel())]
    if not symmetric:
        inits.append(helper.make_tensor("zero_points", TensorProto.UINT8, p.zero_points.shape,
                                        p.zero_points.tobytes(), raw=True))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain=MICROSOFT, K=w.shape[1], N=w.shape[0], bits=bits,
                            block_size=block)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [5, w.shape[1]])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, w.shape[0]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MICROSOFT, 1)])
    model.ir_version = IR_VERSION
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).normal(0, 1, (5, w.shape[1])).astype(np.float32)
    y = session.run(None, {"A": a})[0]
    np.testing.assert_allclose(y, a @ nbits.unpack(p).T, rtol=0, atol=1e-5)


def test_bits_other_than_4_and_8_are_refused():
    with pytest.raises(ValueError, match="bits 3"):
        nbits.pack(weight(), 3, 32, False)
