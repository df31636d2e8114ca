"""`edgeprune prune --method` and a target's sparsity opt-in, on the embedded default model."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import assert_clean_error, edgeprune
from transformers import AutoModelForCausalLM

from conftest import REPO
from edgeprune.gguf_file import read_gguf
from edgeprune.hashing import sha256_file
from edgeprune.inspection import inspect_gguf

pytestmark = pytest.mark.slow
GGUF = "model-SmolLM2-135M-Instruct-Q8_0.gguf"


def _prune(tmp_path, cache_dir, *args: str):
    out = tmp_path / "out"
    return edgeprune("prune", "-o", str(out), "-p", "quick", "--cache-dir", str(cache_dir), *args), out


def test_sparsegpt_2_4_writes_a_sparse_checkpoint_gguf_and_sparsity_json(tmp_path, cache_dir, embedded_reference):
    proc, out = _prune(tmp_path, cache_dir, "--method", "sparsegpt", "--nm", "2:4", "--quant", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert "Sparsity:" in proc.stdout and "no speed-up" in proc.stdout

    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()  # plain transformers
    for name, param in hf.named_parameters():
        if name.startswith("model.layers.") and param.ndim == 2:
            rows, cols = param.shape
            zeros = (param.reshape(rows, cols // 4, 4) == 0).sum(-1)
            assert (zeros >= 2).all(), name
    # Embeddings (tied to the output) are left as they were, as in the papers.
    assert torch.equal(hf.model.embed_tokens.weight, embedded_reference.weights.read("model.embed_tokens.weight"))

    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["method"] == "sparsegpt" and sparsity["spec"]["nm"] == "2:4"
    assert len(sparsity["tensors"]) == 30 * 7
    hf_params = dict(hf.named_parameters())
    for t in sparsity["tensors"]:
        assert t["pruned"] == t["shape"][0] * t["shape"][1] // 2
        assert t["zeros"] == int((hf_params[t["name"]] == 0).sum())
    assert sparsity["seconds"] > 0 and sparsity["calibration_tokens"] == 8 * 96
    # Q8_0 has no per-block offset: every zero survives quantization.
    assert sparsity["gguf"]["decoder_zero_share"] >= 0.5

    gguf = out / GGUF
    assert inspect_gguf(gguf).provenance["sparsity"]["method"] == "sparsegpt"
    shown = edgeprune("inspect", str(gguf))
    assert "sparsity   sparsegpt 2:4" in shown.stdout
    with torch.no_grad():
        logits = hf(torch.tensor([[1, 504, 2432, 28, 3300]])).logits
    assert torch.isfinite(logits).all()
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["details"] == "sparsity.json" and report["quality"]["mean_kld"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["sparsity.json"] == sha256_file(out / "sparsity.json")
    assert read_gguf(gguf).get_field("general.architecture").contents() == "llama"


def test_plan_then_wanda_on_a_per_layer_model(tmp_path, cache_dir):
    plan = tmp_path / "plan.toml"
    plan.write_text("[layers.3]\nheads = 6\n[layers.5]\nmlp = false\n")
    proc, out = _prune(tmp_path, cache_dir, "--plan", str(plan), "--method", "wanda", "--sparsity", "0.3",
                       "--quant", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "hf").exists()  # per-layer shapes: GGUF only
    sparsity = json.loads((out / "sparsity.json").read_text())
    q3 = next(t for t in sparsity["tensors"] if t["name"] == "model.layers.3.self_attn.q_proj.weight")
    assert q3["shape"] == [384, 576] and q3["pruned"] == 384 * int(576 * 0.3)
    assert not any(t["name"].startswith("model.layers.5.mlp.") for t in sparsity["tensors"])  # removed
    assert len(sparsity["tensors"]) == 30 * 7 - 3
    assert read_gguf(out / GGUF).get_field("general.architecture").contents() == "deci"


@pytest.mark.parametrize("args, needle", [
    (["--sparsity", "0.5"], "--sparsity: only meaningful with a sparse method"),
    (["--method", "wanda", "--mask-group", "block"], "unstructured SparseGPT only"),
    (["--method", "lottery"], "Unknown --method 'lottery': structured methods are block-influence"),
    (["--method", "wanda", "--nm", "2:4", "--sparsity", "0.3"], "contradicts 2:4"),
    (["--method", "wanda", "--sparsity", "1.5"], "'sparsity'"),
    (["--method", "wanda", "--nm", "5:7"], "divisible by 7"),
    ([], "give a plan (--plan FILE), a structured or sparse method (--method), or a plan and a sparse method"),
])
def test_bad_sparse_options_fail_cleanly_and_write_nothing(tmp_path, cache_dir, args, needle):
    proc, out = _prune(tmp_path, cache_dir, *args)
    assert_clean_error(proc, needle)
    assert not out.exists()


def test_a_target_that_opts_in_gets_sparse_candidates_measured(tmp_path, cache_dir):
    target = tmp_path / "sparse-demo.toml"
    target.write_text((REPO / "targets" / "demo.toml").read_text() + (
        '\n[sparsity]\nmethod = "magnitude"\nsparsity = 0.5\n'
        'reason = "The controller vendor\'s runtime skips zero blocks."\n'))
    # A space of one depth step (3 layers) and no recipe: the sparse step, then the depth path.
    profile = tmp_path / "tiny-search.toml"
    profile.write_text((REPO / "profiles" / "quick.toml").read_text()
                       .replace("max_candidates = 10", "max_candidates = 2")
                       .replace("max_layer_fraction = 0.5", "max_layer_fraction = 0.1")
                       .replace('recipes = ["default", "iq4_nl-narrow-keep-v"]', 'recipes = ["default"]'))
    out = tmp_path / "out"
    proc = edgeprune("build", "--target", str(target), "--profile", str(profile), "--speedup", "3", "-o", str(out),
                     "--cache-dir", str(cache_dir), "-q")
    assert proc.returncode == 1, proc.stderr  # 3x is out of reach of 3 layers
    report = json.loads((out / "report.json").read_text())
    base, sparse = report["search"]["candidates"][:2]
    assert sparse["step"] == "magnitude 50% sparse" and sparse["plan"] == base["plan"]
    # Measured like any candidate -- and, in llama.cpp on a CPU, neither smaller nor faster.
    assert abs(sparse["size_bytes"] - base["size_bytes"]) < 1024  # the provenance metadata differs, not the tensors
    assert sparse["decode_tok_s"] > 0 and sparse["mean_kld"] > base["mean_kld"]
    assert any("opts in" in n and "skips zero blocks" in n for n in report["notes"])


def test_a_target_without_opt_in_says_why_sparsity_is_not_searched(tmp_path, cache_dir):
    # The unpruned model meets a generous latency budget: one candidate, nothing tuned.
    profile = tmp_path / "one.toml"
    profile.write_text((REPO / "profiles" / "quick.toml").read_text()
                       .replace("repetitions = 3", "repetitions = 3\ntune_settings = false"))
    out = tmp_path / "out"
    proc = edgeprune("build", "--target", "demo", "--profile", str(profile), "--latency-budget", "60", "-o", str(out),
                     "--cache-dir", str(cache_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert all("sparse" not in c["step"] for c in report["search"]["candidates"])
    assert any(n.startswith("Sparsity was not searched") and "neither faster nor smaller" in n
               for n in report["notes"])
