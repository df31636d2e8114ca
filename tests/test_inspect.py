"""`edgeprune inspect` reports what was planned; bad files get one clear sentence."""

from __future__ import annotations

import json

import pytest
from test_cli import assert_clean_error, edgeprune

from conftest import tiny_llama
from edgeprune.export import Provenance, export_gguf
from edgeprune.inspection import inspect_gguf
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


def test_k_quant_fallbacks_are_shown(tmp_path, embedded_tokenizer_spec):
    _, path = _export(tmp_path, Plan(), embedded_tokenizer_spec)
    quantize(path, tmp_path / "q4.gguf", "Q4_K_M", threads=2)
    fallbacks = inspect_gguf(tmp_path / "q4.gguf").fallbacks
    assert fallbacks["count"] == fallbacks["of"]  # widths 64 and 128: no tensor can be a K-quant
    assert set(fallbacks["widths"]) == {64, 128} and fallbacks["by_type"]
    assert inspect_gguf(path).fallbacks["count"] == 0  # F32 asked for nothing else


def test_cli_text_and_json(tmp_path, embedded_tokenizer_spec):
    _, path = _export(tmp_path, PLANS["per-layer"], embedded_tokenizer_spec)
    text = edgeprune("inspect", str(path))
    assert text.returncode == 0, text.stderr
    assert "arch deci" in text.stdout and "attention skipped" in text.stdout and "MLP skipped" in text.stdout
    assert "edgeprune  " in text.stdout and "org/tiny" in text.stdout
    data = json.loads(edgeprune("inspect", str(path), "--json").stdout)
    assert data["architecture"] == "deci" and len(data["layers"]) == 3 and data["provenance"]["plan"]


def _corrupt(tmp_path, good, kind):
    bad = tmp_path / f"{kind}.gguf"
    data = good.read_bytes()
    if kind == "half":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "header-only":
        bad.write_bytes(data[:4096])
    elif kind == "random":
        bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    elif kind == "not-gguf":
        bad.write_bytes(b"\x00" * 1000)
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "directory":
        bad.mkdir()
    return bad


@pytest.mark.parametrize("kind, needle", [
    ("half", "truncated"), ("header-only", "truncated or corrupt"), ("random", "truncated or corrupt"),
    ("not-gguf", "is not a GGUF file"), ("empty", "is not a GGUF file"), ("directory", "is not a file"),
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
