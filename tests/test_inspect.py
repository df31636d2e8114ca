"""`edgeprune inspect` reports what was planned; bad files get one clear sentence."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from test_cli import assert_clean_error, edgeprune

from conftest import tiny_llama
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.gguf_file import read_gguf
from edgeprune.inspection import K_TYPES, inspect_gguf, render
from edgeprune.prune import ModelShape, Plan, apply_plan
from edgeprune.quantize import quantize

CHANNELS = tuple(range(128))
PLANS = {
    "uniform": Plan(drop_layers=(1,), heads=tuple((l, (2, 3)) for l in (0, 2, 3)),
                    ffn=tuple((l, CHANNELS[:64]) for l in (0, 2, 3))),
    "per-layer": Plan(drop_layers=(1,), heads=((0, (1, 3)), (2, ())), ffn=((0, CHANNELS[:100]), (3, ()))),
}


def _export(tmp_path, plan: Plan, spec, tied=True):
    model = apply_plan(tiny_llama(tied=tied), plan)
    path = tmp_path / "m.gguf"
    export_gguf(model, spec, path, "F32", Provenance("org/tiny", "ab" * 32, plan.to_dict()), "tiny")
    return model, path


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_inspect_reports_the_planned_structure(tmp_path, embedded_tokenizer_spec, name, qtype):
    plan = PLANS[name]
    model, path = _export(tmp_path, plan, embedded_tokenizer_spec)
    if qtype != "F32":
        quantize(path, tmp_path / "q.gguf", qtype, threads=2)
        path = tmp_path / "q.gguf"
    info = inspect_gguf(path)
    shape = ModelShape.from_config(tiny_llama(tied=True).config)
    assert info.architecture == ("llama" if name == "uniform" else "deci")
    assert [(l.n_head, l.n_head_kv, l.ffn) for l in info.layers] == [
        (s.n_head, s.n_head_kv, s.ffn) for s in plan.layer_shapes(shape)]
    assert [l.attention for l in info.layers] == [s.has_attention for s in plan.layer_shapes(shape)]
    assert [l.mlp for l in info.layers] == [s.has_mlp for s in plan.layer_shapes(shape)]
    assert Plan.from_dict(info.provenance["plan"]) == plan and info.provenance["source"] == "org/tiny"
    assert info.file_type == qtype
    # (the deci placeholder's width-1 ffn_down cannot be Q8_0: llama.cpp stores it as F16)
    assert info.bits_per_weight == pytest.approx({"F32": 32.0, "Q8_0": 8.5}[qtype], rel=0.01)
    if name == "uniform":  # deci files also hold the placeholder MLP (3 x hidden weights)
        assert info.parameters == model.num_parameters()  # tied embeddings stored once
    assert info.tokenizer["pre"] == "smollm" and info.tokenizer["chat_template"]


def test_untied_output_is_counted(tmp_path, embedded_tokenizer_spec):
    model, path = _export(tmp_path, Plan(), embedded_tokenizer_spec, tied=False)
    info = inspect_gguf(path)
    assert info.parameters == model.num_parameters()
    assert info.groups["output"]["types"] == {"F32": 1} and info.bits_per_weight == 32.0


def test_k_quant_fallbacks_are_shown(tmp_path, embedded_tokenizer_spec):
    _, path = _export(tmp_path, Plan(), embedded_tokenizer_spec)
    quantize(path, tmp_path / "q4.gguf", "Q4_K_M", threads=2)
    fallbacks = inspect_gguf(tmp_path / "q4.gguf").fallbacks
    assert fallbacks["count"] == fallbacks["of"]  # widths 64 and 128: no tensor can be a K-quant
    assert set(fallbacks["widths"]) == {64, 128} and fallbacks["by_type"]
    assert inspect_gguf(path).fallbacks["count"] == 0  # F32 asked for nothing else


def _k_friendly_llama(n_layers: int = 2):
    """Hidden 256 (a K-quant block) but FFN width 320: only ffn_down's input width misses it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=320, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_only_widths_off_the_k_block_fall_back(tmp_path, embedded_tokenizer_spec):
    model = _k_friendly_llama()
    path = tmp_path / "m.gguf"
    export_gguf(model, embedded_tokenizer_spec, path, "F32", Provenance("org/k", "cd" * 32, {}), "k")
    quantize(path, tmp_path / "q4.gguf", "Q4_K_M", threads=2)
    info = inspect_gguf(tmp_path / "q4.gguf")
    assert info.file_type == "Q4_K_M"
    fb = info.fallbacks
    assert fb["count"] == 2 and fb["of"] == 2 * 7 + 1  # the two ffn_down; 7 matrices a layer + token_embd
    assert [w["width"] for w in fb["by_width"]] == [320]
    assert set(fb["by_type"]) <= {"Q5_0", "Q5_1", "Q8_0"}  # llama.cpp's fallbacks for Q4_K / Q6_K
    assert set(info.groups["ffn_down"]["types"]) == set(fb["by_type"])
    for group in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "token_embd"):
        assert set(info.groups[group]["types"]) <= K_TYPES, group
    assert "2 of 15 weight tensors got no K-quant" in render(info)
    assert "width 320 not a multiple of 256" in render(info)
    for group, g in info.groups.items():  # bits per weight follow from the types: Q4_K 4.5, Q6_K 6.5625, ...
        sizes = [gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]] for t in g["types"]]
        assert min(8 * s / b for b, s in sizes) <= g["bits_per_weight"] <= max(8 * s / b for b, s in sizes), group
    # the tied token_embd is also the output layer, so Q4_K_M gives it Q6_K: most weights are 6.56 bpw
    assert info.groups["token_embd"] == {"types": {"Q6_K": 1}, "bits_per_weight": 6.5625}
    assert 4.5 < info.bits_per_weight < 6.5625
    assert info.parameters == model.num_parameters()


def test_embedded_model(embedded_tokenizer_spec):
    from edgeprune.models.embedded import embedded_gguf

    info = inspect_gguf(embedded_gguf())
    assert (info.architecture, info.file_type, info.hidden, info.head_dim) == ("llama", "Q4_1", 576, 64)
    assert [(l.n_head, l.n_head_kv, l.ffn, l.attention, l.mlp) for l in info.layers] == [(9, 3, 1536, True, True)] * 30
    assert info.provenance is None and info.fallbacks["count"] == 0  # Q4_1 is not a K-quant mix
    assert info.tokenizer["vocab"] == info.vocab == 49152 and info.rope["base"] == 100000
    assert info.groups["token_embd"]["types"] == {"Q8_0": 1}
    assert info.groups["attn_q"]["bits_per_weight"] == 5.0  # Q4_1: 20 bytes per 32 weights
    text = render(info)
    assert "blk 0–29: 9 heads / 3 KV / FFN 1536" in text and "not written by edgeprune" in text


HIDDEN, HEAD_DIM, VOCAB = 64, 16, 32


def _write_deci(path, heads, kv, ffn, down_value=0.0, plan: str | None = None, block_count=None, overrides=None):
    """A deci GGUF the way another converter would write one (no edgeprune provenance unless `plan`).
    `overrides`: {key: (value, GGUFValueType)} written over the metadata (hostile values)."""
    rng = np.random.default_rng(0)

    def mat(rows, cols):
        return rng.standard_normal((rows, cols)).astype(np.float32)  # numpy (out, in): GGUF ne0 = in

    w = gguf.GGUFWriter(str(path), "deci")
    w.add_name("hand-made")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_block_count(block_count or len(heads))
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_feed_forward_length(ffn)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    if plan is not None:
        w.add_string("edgeprune.version", "0.0")
        w.add_string("edgeprune.plan", plan)
    for key, (value, vtype) in (overrides or {}).items():
        w.add_key_value(key, value, vtype)
    w.add_tensor("token_embd.weight", mat(VOCAB, HIDDEN))
    for i, (h, k, f) in enumerate(zip(heads, kv, ffn, strict=True)):
        if h:
            w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
            for name, rows in (("attn_q", h * HEAD_DIM), ("attn_k", k * HEAD_DIM), ("attn_v", k * HEAD_DIM)):
                w.add_tensor(f"blk.{i}.{name}.weight", mat(rows, HIDDEN))
            w.add_tensor(f"blk.{i}.attn_output.weight", mat(HIDDEN, h * HEAD_DIM))
        if f:
            w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
            w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(f, HIDDEN))
            w.add_tensor(f"blk.{i}.ffn_up.weight", mat(f, HIDDEN))
            down = np.full((HIDDEN, f), down_value, np.float32) if f == 1 else mat(HIDDEN, f)
            w.add_tensor(f"blk.{i}.ffn_down.weight", down)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


DECI = {"heads": [4, 0, 4, 2], "kv": [2, 0, 2, 1], "ffn": [128, 96, 1, 128]}


def test_a_deci_file_from_elsewhere(tmp_path):
    path = _write_deci(tmp_path / "deci.gguf", **DECI)
    info = inspect_gguf(path)
    assert info.architecture == "deci" and info.provenance is None
    assert [(l.n_head, l.n_head_kv, l.ffn, l.attention, l.mlp) for l in info.layers] == [
        (4, 2, 128, True, True), (0, 0, 96, False, True), (4, 2, 0, True, False), (2, 1, 128, True, True)]
    assert info.parameters == sum(int(t.n_elements) for t in read_gguf(path).tensors)
    assert info.head_dim == HEAD_DIM and info.tokenizer["vocab"] == VOCAB == info.vocab
    text = render(info)
    for line in ("blk 0: 4 heads / 2 KV / FFN 128", "blk 1: attention skipped / FFN 96",
                 "blk 2: 4 heads / 2 KV / MLP skipped", "blk 3: 2 heads / 1 KV / FFN 128",
                 "not written by edgeprune"):
        assert line in text


def test_a_narrow_ffn_with_weights_is_not_a_placeholder(tmp_path):
    info = inspect_gguf(_write_deci(tmp_path / "deci.gguf", **DECI, down_value=0.5))
    assert info.layers[2].mlp and info.layers[2].ffn == 1


def test_malformed_per_layer_metadata(tmp_path):
    path = _write_deci(tmp_path / "deci.gguf", **DECI, block_count=5)  # arrays hold 4 values
    with pytest.raises(EdgepruneError, match=r"deci\.gguf has malformed metadata: deci\.attention\.head_count"):
        inspect_gguf(path)


def test_an_unreadable_plan_is_shown_raw(tmp_path):
    info = inspect_gguf(_write_deci(tmp_path / "deci.gguf", **DECI, plan="{not json"))
    assert info.provenance["plan"] == "{not json"
    assert "plan unreadable" in render(info)


def test_cli_text_and_json(tmp_path, embedded_tokenizer_spec):
    _, path = _export(tmp_path, PLANS["per-layer"], embedded_tokenizer_spec)
    text = edgeprune("inspect", str(path))
    assert text.returncode == 0, text.stderr
    assert "arch deci" in text.stdout and "attention skipped" in text.stdout and "MLP skipped" in text.stdout
    assert "edgeprune  " in text.stdout and "org/tiny" in text.stdout
    assert "heads pruned in 1 layer; attention removed in 1 layer; FFN narrowed in 1 layer; MLP removed in 1 layer" \
        in text.stdout
    data = json.loads(edgeprune("inspect", str(path), "--json").stdout)
    assert data["architecture"] == "deci" and len(data["layers"]) == 3
    assert Plan.from_dict(data["provenance"]["plan"]) == PLANS["per-layer"]
    assert {"file", "size_bytes", "file_type", "parameters", "bits_per_weight", "hidden", "head_dim", "vocab",
            "context_length", "rope", "layers", "tensor_types", "groups", "fallbacks", "tokenizer",
            "provenance"} <= set(data)
    assert set(data["layers"][0]) == {"n_head", "n_head_kv", "ffn", "attention", "mlp"}


def test_read_gguf_parses_every_field_as_gguf_py_does(tmp_path, embedded_tokenizer_spec):
    """The fast path for arrays (a vocabulary's strings, scores, types) yields gguf-py's own parts."""
    _, path = _export(tmp_path, Plan(), embedded_tokenizer_spec)
    theirs, ours = gguf.GGUFReader(str(path)), read_gguf(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types), key
        assert [(p.dtype, p.shape, p.tobytes()) for p in mine.parts] == [
            (p.dtype, p.shape, p.tobytes()) for p in field.parts], key
        assert mine.contents() == field.contents(), key
    assert len(theirs.fields["tokenizer.ggml.tokens"].data) == 49152
    assert [(t.name, t.data_offset) for t in ours.tensors] == [(t.name, t.data_offset) for t in theirs.tensors]


def _corrupt(tmp_path, good, kind):
    bad = tmp_path / f"{kind}.gguf"
    data = good.read_bytes()
    if kind == "half":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "after-header":  # metadata intact, no tensor data at all
        bad.write_bytes(data[: read_gguf(good).data_offset])
    elif kind == "last-byte":
        bad.write_bytes(data[:-1])
    elif kind == "header-only":
        bad.write_bytes(data[:4096])
    elif kind == "in-vocabulary":  # the token count fits, the tokens' text does not
        bad.write_bytes(data[:500_000])
    elif kind == "random":
        bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    elif kind == "random-v3":
        bad.write_bytes(b"GGUF\x03\x00\x00\x00" + np.random.default_rng(0).bytes(3000))
    elif kind == "version-1":
        bad.write_bytes(b"GGUF\x01\x00\x00\x00" + data[8:4096])
    elif kind == "not-gguf":
        bad.write_bytes(b"\x00" * 1000)
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "directory":
        bad.mkdir()
    return bad


@pytest.mark.parametrize("kind, needle", [
    ("half", "is truncated: tensor"), ("after-header", "is truncated: tensor token_embd.weight"),
    ("last-byte", "is truncated: tensor"),
    ("header-only", "truncated or corrupt: tokenizer.ggml.tokens claims 49152 array elements"),
    ("in-vocabulary", "is truncated or corrupt: its metadata (at tokenizer.ggml.tokens) needs byte"),
    ("random", "is corrupt"), ("random-v3", "truncated or corrupt"), ("version-1", "GGUF version 1"),
    ("not-gguf", "is not a GGUF file"), ("empty", "is not a GGUF file"), ("directory", "is not a file"),
    ("missing", "does not exist"),
])
def test_bad_files_get_one_clear_sentence(tmp_path, embedded_tokenizer_spec, kind, needle):
    _, good = _export(tmp_path, Plan(), embedded_tokenizer_spec)
    bad = _corrupt(tmp_path, good, kind)
    proc = edgeprune("inspect", str(bad))
    assert_clean_error(proc, needle, bad.name)
    assert proc.returncode == 2


def test_a_corrupt_gguf_model_is_refused_by_build_and_prune(tmp_path, embedded_tokenizer_spec):
    _, good = _export(tmp_path, Plan(), embedded_tokenizer_spec)
    bad = _corrupt(tmp_path, good, "half")
    out = tmp_path / "out"
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    proc = edgeprune("prune", "--plan", str(plan), "-m", str(bad), "-o", str(out), "--cache-dir", str(tmp_path / "c"))
    assert_clean_error(proc, "truncated", bad.name)
    assert not out.exists()
