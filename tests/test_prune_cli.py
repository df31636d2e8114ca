"""`edgeprune prune`: one plan in, a pruned GGUF (+ HF checkpoint for uniform plans) out."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import WITHOUT_DAC_OVERRIDE, assert_clean_error, edgeprune, unreadable
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from edgeprune.gguf_file import read_gguf
from edgeprune.hashing import sha256_file
from edgeprune.prune import ModelShape, Plan
from edgeprune.prune.modules import materialize

pytestmark = pytest.mark.slow


def _prune(tmp_path, cache_dir, plan_text: str, *extra: str):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    out = tmp_path / "out"
    proc = edgeprune("prune", "--plan", str(plan), "-o", str(out), "-p", "quick", "--cache-dir", str(cache_dir), *extra)
    return proc, out


def test_uniform_plan_writes_gguf_and_a_plain_transformers_checkpoint(tmp_path, cache_dir, embedded_reference):
    proc, out = _prune(tmp_path, cache_dir, "drop_layers = [14, 20]\n[all]\nheads = 6\nffn = 1024\n")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "plan.json").read_text())
    assert record["architecture"] == "llama"
    assert record["layers"] == [{"n_head": 6, "n_head_kv": 3, "ffn": 1024}] * 28

    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()  # plain transformers, no custom code
    c = hf.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (28, 6, 3, 1024)
    expected = materialize(embedded_reference.weights, Plan.from_dict(record["plan"]))
    tokens = torch.tensor([[1, 504, 2432, 28, 3300, 17, 33, 34]])
    with torch.no_grad():
        assert_close(hf(tokens).logits, expected(tokens).logits)

    gguf_file = out / "model-SmolLM2-135M-Instruct-Q4_K_M.gguf"
    reader = read_gguf(gguf_file)
    assert reader.get_field("llama.block_count").contents() == 28
    assert reader.get_field("llama.feed_forward_length").contents() == 1024
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"][gguf_file.name] == sha256_file(gguf_file)
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["quality"]["mean_kld"] and report["hf_checkpoint"] == "hf"
    assert "mean KLD" in proc.stdout and "architecture llama" in proc.stdout


def test_per_layer_plan_writes_a_deci_gguf_and_no_checkpoint(tmp_path, cache_dir):
    plan = "drop_layers = [20]\n[layers.5]\nheads = 3\nkv_heads = 1\n[layers.7]\nattention = false\n" \
           "[layers.9]\nmlp = false\n[layers.12]\nffn = 512\n"
    proc, out = _prune(tmp_path, cache_dir, plan, "--quant", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "hf").exists()
    reader = read_gguf(out / "model-SmolLM2-135M-Instruct-Q8_0.gguf")
    assert reader.get_field("general.architecture").contents() == "deci"
    heads = reader.get_field("deci.attention.head_count").contents()
    ffn = reader.get_field("deci.feed_forward_length").contents()
    assert len(heads) == 29 and heads[5] == 3 and heads[7] == 0 and heads[0] == 9
    assert ffn[12] == 512 and ffn[9] == 1  # 1: the placeholder MLP that keeps layer 9's attention output
    plan = Plan.from_dict(json.loads((out / "plan.json").read_text())["plan"])
    shape = ModelShape(30, 9, 3, 64, 576, 1536, 49152)
    assert len(plan.kept_kv_heads(5, shape)) == 1 and plan.kept_channels(9, shape) == ()


def test_a_per_layer_plan_written_for_onnx_runtime(tmp_path, cache_dir):
    import numpy as np

    from edgeprune.runtimes.onnx import session

    plan = "drop_layers = [20]\n[layers.5]\nheads = 3\nkv_heads = 1\n[layers.9]\nmlp = false\n"
    proc, out = _prune(tmp_path, cache_dir, plan, "--runtime", "onnxruntime", "--quant", "INT8", "--no-imatrix")
    assert proc.returncode == 0, proc.stderr
    model = out / "model-SmolLM2-135M-Instruct-INT8.onnx"
    data = model.with_name(model.name + ".data")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"][model.name] == sha256_file(model) and manifest["files"][data.name] == sha256_file(data)
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"] == "onnxruntime" and report["quant"] == "INT8"
    assert 0 < report["quality"]["mean_kld"] < 1.0
    # The copy's graph names its own, longer data file name in every external tensor.
    assert 0 < model.stat().st_size + data.stat().st_size - report["size_bytes"] < 64 << 10
    # The copy names its own data file: it runs from the output directory alone.
    (logits,) = session.sequence_logits(model, np.array([[1, 504, 2432, 28, 3300]]), threads=2)
    assert logits.shape == (5, 49152) and np.isfinite(logits).all()
    assert "GGUF" not in proc.stdout and "mean KLD" in proc.stdout


@pytest.mark.parametrize("plan_text, needle", [
    ("drop_layer = [3]\n", "unknown key 'drop_layer'"),
    ("[layers.0]\nattention = false\n", "first kept layer"),
    ("[all]\nheads = 5\n", "cannot be split evenly"),
    ("drop_layers = [40]\n", "the model has 30"),
    ("drop_layers = [\n", "not valid TOML"),
])
def test_bad_plans_fail_cleanly_and_write_nothing(tmp_path, cache_dir, plan_text, needle):
    proc, out = _prune(tmp_path, cache_dir, plan_text)
    assert_clean_error(proc, needle)
    assert not out.exists()


def case_study_model(directory):
    """Llama-3.1-8B's attention geometry at toy depth and width: hidden 1024, 16 heads over 4 KV heads of 64."""
    from conftest import save_tiny_hf

    return save_tiny_hf(directory, n_layers=3, hidden=1024, n_head=16, n_head_kv=4, head_dim=64, ffn=256)


def test_plan_plain_transformers_cannot_hold_gets_the_gguf_and_a_note(tmp_path, cache_dir):
    """12 of 16 heads (Llama-3.1-8B's 32 -> 24): hidden 1024 is no multiple of 12, which transformers 5
    refuses; the GGUF is written and the missing checkpoint explained, not a crash at save time."""
    from conftest import calibration_text

    model = case_study_model(tmp_path / "llama-1024")
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text())
    proc, out = _prune(tmp_path, cache_dir, "drop_layers = [1]\n[all]\nheads = 12\nkv_heads = 3\n",
                       "--model", str(model), "--calib", str(calib))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["hf_checkpoint"] is None and not (out / "hf").exists()
    assert "hidden size (1024)" in report["hf_checkpoint_note"] and "(12)" in report["hf_checkpoint_note"]
    hf_line = next(l for l in proc.stdout.splitlines() if l.startswith("HF:"))
    assert "none" in hf_line and "hidden size (1024)" in hf_line and "GGUF" in hf_line
    reader = read_gguf(out / report["artifact"])
    assert reader.get_field("llama.block_count").contents() == 2
    assert reader.get_field("llama.attention.head_count").contents() == 12
    assert reader.get_field("llama.attention.head_count_kv").contents() == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {report["artifact"], "plan.json", "report.json"}


def test_force_replaces_edgeprunes_output_and_nothing_beside_it(tmp_path, cache_dir):
    """--force swaps a previous output for the new one; an `.out.old` the user keeps beside it survives."""
    from conftest import calibration_text, save_tiny_hf

    model = save_tiny_hf(tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text())
    args = ("--model", str(model), "--calib", str(calib), "--quant", "Q8_0", "--no-imatrix")
    proc, out = _prune(tmp_path, cache_dir, "drop_layers = [1]\n", *args)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((out / "report.json").read_text())
    kept = tmp_path / ".out.old"
    kept.mkdir()
    (kept / "mine.txt").write_text("not edgeprune's")
    proc, out = _prune(tmp_path, cache_dir, "drop_layers = [2]\n", *args, "--force")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["plan"] != first["plan"]
    assert (kept / "mine.txt").read_text() == "not edgeprune's"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.old"]


def test_unreadable_calibration_file(tmp_path):
    from conftest import calibration_text, save_tiny_hf

    model = save_tiny_hf(tmp_path / "tiny")
    calib = unreadable(tmp_path / "calib.txt", calibration_text())
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    proc = edgeprune("prune", "--plan", str(plan), "--model", str(model), "--calib", str(calib), "-p", "quick", "-q",
                     "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), prefix=WITHOUT_DAC_OVERRIDE)
    assert_clean_error(proc, "Cannot read --calib", "calib.txt", "Permission denied")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
