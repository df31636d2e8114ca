"""The ONNX decoder's parity: onnxruntime's logits for an exported model, pruned or not, agree with
the torch model it came from, over a whole prompt and through the KV cache.

Tolerance, by measurement: fp32 graphs differ from torch by ~1e-5 of the logits' spread (the
spike and these models: 5e-6 to 1e-5 on spreads of ~11); the bound is 1e-4 of the spread, far
below what a misplaced head or channel causes (the negative control moves logits by whole units).
Block-quantized graphs are compared with torch running the very weights they hold (unpacked).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_llama
from edgeprune.export import Provenance
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import Plan, apply_plan
from edgeprune.runtimes.onnx import nbits, session
from edgeprune.runtimes.onnx.llama import MetadataKeys, OnnxWeights, write_onnx

TOKENS = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77, 6345, 2]])
C = tuple(range(128))
PLANS = {
    "unpruned": Plan(),
    "depth": Plan(drop_layers=(1, 2)),
    "heads": Plan(heads=tuple((l, (2, 3)) for l in range(4))),  # drop KV group 0
    "ffn": Plan(ffn=tuple((l, C[::2]) for l in range(4))),
    "per-layer heads and KV": Plan(heads=((0, (0, 2)), (1, (2, 3)), (3, (1,)))),
    "attention removed": Plan(heads=((2, ()),)),
    "mlp removed": Plan(ffn=((1, ()),)),
    "combined": Plan(drop_layers=(1,), heads=((0, (1, 3)), (2, ())), ffn=((0, C[:100]), (3, ()))),
}
MODELS = {
    "gqa-tied": dict(tied=True, n_head=4, n_head_kv=2),
    "gqa-untied": dict(tied=False, n_head=4, n_head_kv=2),
    "mha-untied": dict(tied=False, n_head=4, n_head_kv=4),
}
PROVENANCE = Provenance("tiny", "0" * 64, {"drop_layers": [1]})
FP32 = OnnxWeights()


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits[0].numpy()


def export(tmp_path, model_kwargs, plan, weights=FP32, name="model.onnx"):
    path = tmp_path / name
    write_onnx(ModuleStore(tiny_llama(**model_kwargs)), plan, path, weights, PROVENANCE, "tiny")
    return path


def assert_close(expected: np.ndarray, got: np.ndarray) -> None:
    spread = float(expected.max() - expected.min())
    assert spread > 5.0, "test model too flat for top-1 to mean anything"
    assert (expected.argmax(-1) == got.argmax(-1)).all()
    assert np.abs(expected - got).max() <= 1e-4 * spread, np.abs(expected - got).max()


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fp32_logits_match_torch(tmp_path, model_name, plan_name):
    plan = PLANS[plan_name]
    if model_name.startswith("mha") and plan.heads:  # MHA: a KV head per query head
        plan = Plan(drop_layers=plan.drop_layers, ffn=plan.ffn,
                    heads=tuple((l, tuple(h for h in heads if h != 0)) for l, heads in plan.heads))
    expected = torch_logits(apply_plan(tiny_llama(**MODELS[model_name]), plan))
    path = export(tmp_path, MODELS[model_name], plan)
    assert_close(expected, next(session.sequence_logits(path, TOKENS, threads=2)))


@pytest.mark.parametrize("plan_name", ["unpruned", "combined", "per-layer heads and KV"])
def test_decoding_through_the_cache_matches_torch(tmp_path, plan_name):
    """Prompt, then one token at a time through present -> past: the same logits as the whole
    sequence in torch, and the same greedy answer as transformers' generate."""
    plan = PLANS[plan_name]
    reference = apply_plan(tiny_llama(**MODELS["gqa-untied"]), plan)
    path = export(tmp_path, MODELS["gqa-untied"], plan)
    decoder = session.Decoder(path, session.SessionSettings(threads=2))
    prompt = 7
    logits, cache = decoder.step(TOKENS[:, :prompt], decoder.empty_cache(1))
    steps = [logits[0]]
    for t in TOKENS[0, prompt:]:
        logits, cache = decoder.step(np.array([[t]]), cache)
        steps.append(logits[0])
    assert_close(torch_logits(reference), np.concatenate(steps))
    with torch.no_grad():
        expected = reference.generate(torch.from_numpy(TOKENS[:, :prompt]), max_new_tokens=8, do_sample=False,
                                      min_new_tokens=8)[0, prompt:].tolist()
    assert session.greedy(path, TOKENS[0, :prompt].tolist(), 8, threads=2) == expected
    # A stop token ends the answer before it (the chat check's end of turn).
    assert session.greedy(path, TOKENS[0, :prompt].tolist(), 8, 2, frozenset({expected[3]})) == \
        expected[:expected.index(expected[3])]


def test_the_cache_holds_each_layers_own_kv_heads(tmp_path):
    decoder = session.Decoder(export(tmp_path, MODELS["gqa-untied"], PLANS["per-layer heads and KV"]),
                              session.SessionSettings(threads=1))
    assert {name: heads for name, (heads, dim) in decoder.cache.items() if name.endswith(".key")} == {
        "past_key_values.0.key": 2, "past_key_values.1.key": 1, "past_key_values.2.key": 2,
        "past_key_values.3.key": 1}
    # Kept layers 0, 2, 3 become 0, 1, 2, and layer 1 (was 2) lost its attention: it has no cache.
    decoder = session.Decoder(export(tmp_path, MODELS["gqa-untied"], PLANS["combined"], name="combined.onnx"),
                              session.SessionSettings(threads=1))
    assert sorted(decoder.cache) == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.2.key",
                                     "past_key_values.2.value"]
    assert set(decoder.cache.values()) == {(2, 16)}


def unpacked_reference(model_kwargs: dict, plan: Plan, weights: OnnxWeights):
    """The torch model computing with exactly the weights a quantized export holds."""
    model = apply_plan(tiny_llama(**model_kwargs), plan)
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight.numpy()
                module.weight.copy_(torch.from_numpy(nbits.unpack(
                    nbits.pack(w, weights.bits, weights.block, weights.symmetric))))
        embedding = q.model.embed_tokens.weight
        head = model.lm_head.weight.numpy().copy()
        embedding.copy_(embedding.half().float())
        if model.config.tie_word_embeddings:
            q.lm_head.weight = torch.nn.Parameter(q.lm_head.weight.clone())  # untie: the head has its own bits
        q.lm_head.weight.copy_(torch.from_numpy(nbits.unpack(
            nbits.pack(head, weights.head_bits, weights.block, weights.symmetric))))
    return q


@pytest.mark.parametrize("weights", [OnnxWeights(bits=4), OnnxWeights(bits=4, block=128, symmetric=True),
                                     OnnxWeights(bits=8)], ids=lambda w: w.describe())
@pytest.mark.parametrize("model_name", ["gqa-tied", "gqa-untied"])
def test_quantized_graphs_compute_with_their_packed_weights(tmp_path, model_name, weights):
    plan = PLANS["combined"]
    expected = torch_logits(unpacked_reference(MODELS[model_name], plan, weights))
    path = export(tmp_path, MODELS[model_name], plan, weights)
    assert_close(expected, next(session.sequence_logits(path, TOKENS, threads=2)))
    # The decoder's weights take bits + (32 + bits) / block bits per value, norms aside (blocks of 128
    # are padded here: the tiny model's rows are 64 wide).
    fp32 = export(tmp_path, MODELS[model_name], plan, name="fp32.onnx")
    ratio = decoder_bytes(path) / decoder_bytes(fp32)
    nominal = (weights.bits + (32 + weights.bits) / weights.block) / 32
    assert ratio == pytest.approx(nominal, rel=0.05) if weights.block == 32 else nominal < ratio < 2 * nominal


def decoder_bytes(path) -> int:
    """Bytes of the decoder layers' initializers."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.name.startswith("model.layers."):
            external = {e.key: e.value for e in t.external_data}
            total += int(external["length"]) if external else len(t.raw_data) or 4 * len(t.float_data)
    return total


def test_the_file_records_provenance_and_keeps_weights_outside_the_protobuf(tmp_path):
    path = export(tmp_path, MODELS["gqa-untied"], PLANS["combined"], OnnxWeights(bits=4))
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[MetadataKeys.SOURCE] == "tiny" and json.loads(meta[MetadataKeys.PLAN]) == {"drop_layers": [1]}
    assert json.loads(meta[MetadataKeys.WEIGHTS])["bits"] == 4 and meta[MetadataKeys.CONTEXT] == "256"
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e.value == "model.onnx.data" for t in external for e in t.external_data
                            if e.key == "location")
    assert path.stat().st_size < 200_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_a_failed_export_leaves_nothing(tmp_path):
    store = ModuleStore(tiny_llama(**MODELS["gqa-untied"]))

    def broken(name, w, bits, block, symmetric):
        if "layers.2" in name:
            raise RuntimeError("disk full")
        return nbits.pack(w, bits, block, symmetric)

    with pytest.raises(RuntimeError, match="disk full"):
        write_onnx(store, Plan(), tmp_path / "model.onnx", OnnxWeights(bits=4), PROVENANCE, "tiny", quantizer=broken)
    assert list(tmp_path.iterdir()) == []


def test_each_tensor_is_read_once(tmp_path):
    """Streaming: every source tensor is read when its node is written, and only then."""
    store = ModuleStore(tiny_llama(**MODELS["gqa-untied"]))
    reads: dict[str, int] = {}
    read = store.read

    def counting(name):
        reads[name] = reads.get(name, 0) + 1
        return read(name)

    store.read = counting
    write_onnx(store, PLANS["combined"], tmp_path / "model.onnx", OnnxWeights(bits=4), PROVENANCE, "tiny")
    assert reads and max(reads.values()) == 1
    assert not any(name.startswith("model.layers.1.") for name in reads)  # the dropped layer is never read
