"""A plan's per-token costs predicted on paper, against the GGUF llama.cpp really writes for it."""

from __future__ import annotations

import pytest

from conftest import tiny_llama
from edgeprune.export import Provenance
from edgeprune.export.gguf_llama import write_gguf
from edgeprune.gguf_file import read_gguf
from edgeprune.latency import ModelTraffic
from edgeprune.latency.planned import TrafficPlanner
from edgeprune.latency.traffic import TensorCost
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import ModelShape, Plan
from edgeprune.quantize import RECIPES, quantize, tensor_shapes

QUANT = "Q4_K_M"
# Hidden 384 (not a multiple of 256): the attention and up/gate projections fall back to Q5_0 / Q8_0;
# 4 of 6 heads make attn_output 256 wide (it packs again), FFN 512 of 768 stays packable.
HEAD_DIM, N_HEAD, N_KV, FFN = 64, 6, 2, 768
FOUR_HEADS = tuple((layer, (0, 1, 3, 4)) for layer in range(4))
PLANS = {
    "unpruned": Plan(),
    "-1 layer": Plan(drop_layers=(1,)),
    "4 heads, FFN 512": Plan(heads=FOUR_HEADS, ffn=tuple((layer, tuple(range(512))) for layer in range(4))),
    "-1 attention, 4 heads": Plan(heads=((2, ()),) + tuple(h for h in FOUR_HEADS if h[0] != 2)),
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, embedded_tokenizer_spec):
    """Every plan under every recipe, exported and quantized for real."""
    model = tiny_llama(tied=True, n_head=N_HEAD, n_head_kv=N_KV, hidden=N_HEAD * HEAD_DIM, head_dim=HEAD_DIM, ffn=FFN)
    root, store = tmp_path_factory.mktemp("planned"), ModuleStore(model)
    files = {}
    for label, plan in PLANS.items():
        f32 = root / f"{label}.f32.gguf"
        write_gguf(store, plan, embedded_tokenizer_spec, f32, "F32", Provenance("t", "0" * 64, {}), "t")
        for recipe in ("default", "iq4_nl-narrow-keep-v", "q4_0-narrow-q5_0-output"):
            out = root / f"{label}.{recipe}.gguf"
            quantize(f32, out, QUANT, threads=2, overrides=RECIPES[recipe].overrides(tensor_shapes(f32), QUANT))
            files[label, recipe] = out
    return files


@pytest.fixture(scope="module")
def planner(quantized) -> TrafficPlanner:
    shape = ModelShape(n_layers=4, n_head=N_HEAD, n_head_kv=N_KV, head_dim=HEAD_DIM, hidden=N_HEAD * HEAD_DIM,
                       ffn=FFN, vocab=49152)
    return TrafficPlanner(quantized["unpruned", "default"], shape, QUANT)


def _layer_bytes(traffic_tensors) -> int:
    return sum(t.n_bytes for t in traffic_tensors if t.name.startswith("blk."))


@pytest.mark.parametrize("recipe", ["default", "iq4_nl-narrow-keep-v", "q4_0-narrow-q5_0-output"])
@pytest.mark.parametrize("label", list(PLANS))
def test_planned_costs_match_the_quantized_file(quantized, planner, label, recipe):
    actual_file = quantized[label, recipe]
    reader = read_gguf(actual_file)
    actual = ModelTraffic.from_gguf(actual_file)
    planned = planner.traffic(PLANS[label], RECIPES[recipe], "planned")
    # Heads and depth are exact; bytes within the mixture's layer-numbered extra bits.
    assert (planned.kv_bytes_per_position, planned.attention_flops_per_position) == (
        actual.kv_bytes_per_position, actual.attention_flops_per_position)
    assert planned.parameters == actual.parameters and planned.flops_per_token == actual.flops_per_token
    real = [TensorCost.of(t) for t in reader.tensors]
    assert _layer_bytes(planner.tensor_costs(PLANS[label], RECIPES[recipe])) == pytest.approx(_layer_bytes(real),
                                                                                              rel=0.06)
    assert planned.weight_bytes_per_token == pytest.approx(actual.weight_bytes_per_token, rel=0.02)
    assert planned.file_bytes == pytest.approx(actual.file_bytes, rel=0.02)
