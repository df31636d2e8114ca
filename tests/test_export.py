"""Every export path's parity: the F32 GGUF in llama.cpp agrees with the torch model it came from.

Tolerance, justified by measurement: with an F32 KV cache, llama.cpp's logits for these models
differ from torch's fp32 by ~1e-5 of their spread (the two sum in different orders). We require
the same top-1 token everywhere, and a max difference no worse than what llama.cpp's own
convert_hf_to_gguf.py reaches on the same model (plus 1e-4 of the logits' range for ties).
With llama.cpp's default F16 KV cache, K/V rounding alone moves a pruned SmolLM's logits by up
to ~0.2, which is why parity is checked with F32 caches.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_converter, tiny_llama
from edgeprune.export import Provenance, export_gguf
from edgeprune.gguf_file import read_gguf
from edgeprune.inspection import inspect_gguf
from edgeprune.models.tokenizer import TokenizerSpec
from edgeprune.prune import ModelShape, Plan, apply_plan
from edgeprune.prune.modules import materialize
from edgeprune.runtimes import llamacpp

TOKENS = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77, 6345, 2]])
ALL_CHANNELS = tuple(range(128))
PLANS = {
    "unpruned": Plan(),
    "depth": Plan(drop_layers=(1, 2)),
    "heads": Plan(heads=tuple((l, (2, 3)) for l in range(4))),  # drop KV group 0
    "depth+heads": Plan(drop_layers=(0,), heads=tuple((l, (1, 3)) for l in (1, 2, 3))),  # 1 query per group
    "ffn": Plan(ffn=tuple((l, ALL_CHANNELS[::2]) for l in range(4))),
}
# Plans whose layers differ: exported as arch `deci`, which the converter cannot produce from an HF dir.
DECI_PLANS = {
    "per-layer heads and KV": Plan(heads=((0, (0, 2)), (1, (2, 3)), (3, (1,)))),
    "per-layer ffn": Plan(ffn=((0, ALL_CHANNELS[:32]), (2, ALL_CHANNELS[5:]))),
    "attention removed": Plan(heads=((2, ()),)),
    "mlp removed": Plan(ffn=((1, ()),)),
    "combined": Plan(drop_layers=(1,), heads=((0, (1, 3)), (2, ())), ffn=((0, ALL_CHANNELS[:100]), (3, ()))),
}
MODELS = {
    "gqa-tied": dict(tied=True, n_head=4, n_head_kv=2),
    "gqa-untied": dict(tied=False, n_head=4, n_head_kv=2),
    "mha-untied": dict(tied=False, n_head=4, n_head_kv=4),
}


def _llama_cpp_logits(path) -> np.ndarray:
    return next(llamacpp.sequence_logits(path, TOKENS, threads=2, f32_kv_cache=True))


def _compare(torch_logits: np.ndarray, gguf_logits: np.ndarray) -> tuple[float, float]:
    top1 = float((torch_logits.argmax(-1) == gguf_logits.argmax(-1)).mean())
    return top1, float(np.abs(torch_logits - gguf_logits).max())


def converter_agreement(model, expected: np.ndarray, tmp_path, llama_cpp_src, tokenizer) -> tuple[float, float]:
    """(top-1, max diff) of llama.cpp's own converter's F32 GGUF of `model` against `expected`."""
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    theirs = tmp_path / "converter.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs)
    return _compare(expected, _llama_cpp_logits(theirs))


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_f32_gguf_logits_match_torch_and_the_converter(tmp_path, model_name, plan_name, llama_cpp_src,
                                                        embedded_reference, embedded_tokenizer_spec):
    plan = PLANS[plan_name]
    if model_name.startswith("mha") and plan_name in ("heads", "depth+heads"):
        plan = Plan(drop_layers=plan.drop_layers, heads=tuple((l, (0, 3)) for l, _ in plan.heads))
    model = apply_plan(tiny_llama(**MODELS[model_name]), plan)
    with torch.no_grad():
        expected = model(torch.from_numpy(TOKENS)).logits[0].numpy()

    ours = tmp_path / "ours.gguf"
    export_gguf(model, embedded_tokenizer_spec, ours, "F32", Provenance("tiny", "0" * 64, plan.to_dict()), "tiny")
    top1, maxdiff = _compare(expected, _llama_cpp_logits(ours))

    ref_top1, ref_maxdiff = converter_agreement(model, expected, tmp_path, llama_cpp_src, embedded_reference.tokenizer)

    spread = float(expected.max() - expected.min())
    assert spread > 5.0, "test model too flat for top-1 to mean anything"
    assert top1 == 1.0 and top1 >= ref_top1
    assert maxdiff <= ref_maxdiff + 1e-4 * spread, (maxdiff, ref_maxdiff)
    assert read_gguf(ours).get_field("general.architecture").contents() == "llama"


@pytest.mark.parametrize("plan_name", list(DECI_PLANS))
@pytest.mark.parametrize("model_name", ["gqa-tied", "gqa-untied"])
def test_per_layer_structures_export_as_deci_and_match_torch(tmp_path, model_name, plan_name,
                                                            embedded_tokenizer_spec):
    """No converter oracle for deci: the bound is 1e-4 of the logits' spread, ~100x the error
    measured on uniform exports and far below what a misplaced head or channel causes."""
    plan = DECI_PLANS[plan_name]
    model = apply_plan(tiny_llama(**MODELS[model_name]), plan)
    with torch.no_grad():
        expected = model(torch.from_numpy(TOKENS)).logits[0].numpy()
    path = tmp_path / "deci.gguf"
    export_gguf(model, embedded_tokenizer_spec, path, "F32", Provenance("tiny", "0" * 64, plan.to_dict()), "tiny")
    assert read_gguf(path).get_field("general.architecture").contents() == "deci"
    planned = plan.layer_shapes(ModelShape.from_config(tiny_llama(**MODELS[model_name]).config))
    assert [(l.n_head, l.n_head_kv, l.ffn) for l in inspect_gguf(path).layers] == [
        (s.n_head, s.n_head_kv, s.ffn) for s in planned]
    top1, maxdiff = _compare(expected, _llama_cpp_logits(path))
    spread = float(expected.max() - expected.min())
    assert spread > 5.0
    assert top1 == 1.0 and maxdiff <= 1e-4 * spread, maxdiff


def _fields(path) -> dict:
    reader = read_gguf(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            value = field.contents()
            out[key] = value
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, np.array(t.data)) for t in reader.tensors}
    return out, tensors


@pytest.mark.slow
def test_unpruned_export_carries_the_converters_metadata_tokenizer_and_tensors(tmp_path, llama_cpp_src,
                                                                              embedded_reference):
    """Oracle: for the unpruned embedded model, our writer and llama.cpp's converter agree."""
    ref = embedded_reference
    hf_dir = tmp_path / "hf"
    materialize(ref.weights).save_pretrained(hf_dir)
    ref.tokenizer.save_pretrained(hf_dir)
    spec = TokenizerSpec.from_hf(ref.tokenizer, ref.config.vocab_size)
    ours = tmp_path / "ours.gguf"
    export_gguf(materialize(ref.weights), spec, ours, "F32", Provenance("x", "0" * 64, {}), "x")
    theirs = tmp_path / "theirs.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs)

    our_fields, our_tensors = _fields(ours)
    their_fields, their_tensors = _fields(theirs)
    for key, value in their_fields.items():
        assert key in our_fields, f"we do not write {key}"
        assert our_fields[key] == value, key
    assert our_fields["tokenizer.ggml.pre"] == "smollm"
    assert set(our_tensors) == set(their_tensors)
    for name, (shape, dtype, data) in their_tensors.items():
        assert our_tensors[name][:2] == (shape, dtype), name
        assert np.array_equal(our_tensors[name][2], data), name


def test_f16_export_halves_the_file_and_keeps_top1(tmp_path, embedded_tokenizer_spec):
    model = tiny_llama(tied=False)
    with torch.no_grad():
        expected = model(torch.from_numpy(TOKENS)).logits[0].numpy()
    paths = {}
    for dtype in ("F32", "F16"):
        paths[dtype] = tmp_path / f"{dtype}.gguf"
        export_gguf(model, embedded_tokenizer_spec, paths[dtype], dtype, Provenance("t", "0" * 64, {}), "t")
    assert paths["F16"].stat().st_size < 0.55 * paths["F32"].stat().st_size
    top1, maxdiff = _compare(expected, _llama_cpp_logits(paths["F16"]))
    assert top1 >= 0.9 and maxdiff < 0.05 * float(expected.max() - expected.min())


def test_export_writes_provenance(tmp_path, embedded_tokenizer_spec):
    from edgeprune.export.gguf_llama import ProvenanceKeys

    plan = Plan(drop_layers=(1,))
    path = tmp_path / "p.gguf"
    export_gguf(apply_plan(tiny_llama(tied=True), plan), embedded_tokenizer_spec, path, "F32",
                Provenance("org/model", "ab" * 32, plan.to_dict()), "model")
    reader = read_gguf(path)
    assert reader.get_field(ProvenanceKeys.SOURCE).contents() == "org/model"
    assert reader.get_field(ProvenanceKeys.SOURCE_SHA256).contents() == "ab" * 32
    assert Plan.from_dict(json.loads(reader.get_field(ProvenanceKeys.PLAN).contents())) == plan
    assert reader.get_field("llama.block_count").contents() == 3
