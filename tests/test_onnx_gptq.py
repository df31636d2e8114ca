"""GPTQ onto MatMulNBits' grid: on small tensors, it is round-to-nearest when inputs are
uncorrelated and beats it on the layer's output when they are not; on a tiny model, the sequential
pass gives a file closer to the original than round-to-nearest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from edgeprune.export import Provenance
from edgeprune.models.streamed import DecoderStream
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import Plan
from edgeprune.runtimes.onnx import nbits, session
from edgeprune.runtimes.onnx.calibrated import SequentialGptq
from edgeprune.runtimes.onnx.gptq import gptq
from edgeprune.runtimes.onnx.llama import OnnxWeights, write_onnx
from edgeprune.sparse.sparsegpt import HessianAccumulator

SETTINGS = [(4, 32, False), (4, 128, True), (8, 32, False)]


def correlated_inputs(tokens: int = 2048, k: int = 160, seed: int = 0) -> torch.Tensor:
    """Inputs with a few dominant, correlated directions and outlier channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, k, generator=g)
    x = torch.randn(tokens, 8, generator=g) @ basis + 0.1 * torch.randn(tokens, k, generator=g)
    x[:, :4] *= 6
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.h


@pytest.mark.parametrize(("bits", "block", "symmetric"), SETTINGS)
def test_with_uncorrelated_inputs_gptq_is_round_to_nearest(bits, block, symmetric):
    w = np.random.default_rng(0).normal(0, 0.05, (24, 160)).astype(np.float32)
    ours = gptq(w, torch.eye(160), bits, block, symmetric)
    rtn = nbits.pack(w, bits, block, symmetric)
    assert np.array_equal(ours.weight, rtn.weight)
    np.testing.assert_array_equal(ours.scales, rtn.scales)


@pytest.mark.parametrize(("bits", "block", "symmetric"), SETTINGS)
def test_gptq_moves_the_layers_output_less_than_rounding(bits, block, symmetric):
    w = np.random.default_rng(1).normal(0, 0.05, (24, 160)).astype(np.float32)
    x = correlated_inputs()
    packed = gptq(w, hessian_of(x), bits, block, symmetric)
    assert packed.weight.shape == nbits.pack(w, bits, block, symmetric).weight.shape

    def output_error(p: nbits.Packed) -> float:
        return float(((x @ torch.from_numpy(nbits.unpack(p) - w).T) ** 2).mean())

    assert output_error(packed) < 0.7 * output_error(nbits.pack(w, bits, block, symmetric))


def test_the_sequential_pass_gives_a_model_closer_to_the_original(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(tied=False, vocab=512, hidden=128, head_dim=32, ffn=256)
    with torch.no_grad():  # text the model itself finds likely: calibration and held-out windows
        tokens = model.generate(torch.ones(16, 1, dtype=torch.long), attention_mask=torch.ones(16, 1), do_sample=True,
                                top_k=50, max_new_tokens=127, min_new_tokens=127)
        reference = torch.log_softmax(model(tokens[12:]).logits, -1)
    store, weights, provenance = ModuleStore(model), OnnxWeights(bits=4), Provenance("tiny", "0" * 64, {})

    def kld(path) -> float:
        out = []
        for ref, logits in zip(reference, session.sequence_logits(path, tokens[12:].numpy(), threads=2), strict=True):
            out.append(float((ref.exp() * (ref - torch.log_softmax(torch.from_numpy(logits), -1))).sum(-1).mean()))
        return float(np.mean(out))

    write_onnx(store, Plan(), tmp_path / "rtn.onnx", weights, provenance, "tiny")
    quantizer = SequentialGptq(DecoderStream(store), tokens[:12])
    write_onnx(store, Plan(), tmp_path / "gptq.onnx", weights, provenance, "tiny", quantizer=quantizer)
    quantizer.close()
    assert quantizer.tokens == 12 * 128 and quantizer.seconds > 0
    rtn, calibrated = kld(tmp_path / "rtn.onnx"), kld(tmp_path / "gptq.onnx")
    assert calibrated < 0.92 * rtn, (calibrated, rtn)


def test_weights_asked_for_out_of_layer_order_are_refused(tmp_path):
    model = tiny_llama(tied=False, vocab=512)
    quantizer = SequentialGptq(DecoderStream(ModuleStore(model)), torch.ones(2, 16, dtype=torch.long))
    w = model.model.layers[2].mlp.up_proj.weight.detach().numpy()
    quantizer("model.layers.2.mlp.up_proj.weight", w, 4, 32, False)
    with pytest.raises(ValueError, match="layer 1 was asked for after layer 2"):
        quantizer("model.layers.1.mlp.up_proj.weight", w, 4, 32, False)
    quantizer.close()
