"""Quantization types, the importance matrix and per-tensor recipes, on tiny in-process models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.gguf_file import bits_per_weight, read_gguf
from edgeprune.prune import Plan, apply_plan
from edgeprune.quantize import QUANT_FTYPES, RECIPES, collect_imatrix, quantize, tensor_shapes
from edgeprune.quantize.imatrix import add_squares
from edgeprune.runtimes import llamacpp

TOKENS = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77]])


def _model(hidden: int = 256, tied: bool = True):
    """K-quants need input widths that are multiples of 256: hidden 256 (and FFN 512) allow them."""
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.ndim > 1 else p.fill_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory, embedded_tokenizer_spec):
    path = tmp_path_factory.mktemp("q") / "f32.gguf"
    export_gguf(_model(), embedded_tokenizer_spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    return path


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in read_gguf(path).tensors}


@pytest.mark.parametrize("qtype", list(QUANT_FTYPES))
def test_every_type_quantizes_and_loads(tmp_path, f32_file, qtype):
    out = tmp_path / f"{qtype}.gguf"
    quantize(f32_file, out, qtype, threads=2)
    types = _types(out)
    expected_attn_q = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K"}
    if qtype in expected_attn_q:
        assert types["blk.0.attn_q.weight"] == expected_attn_q[qtype]
    else:  # K-quant mixtures: K types only, since every width here is a multiple of 256
        assert all(t.endswith("_K") or t == "F32" for t in types.values()), types
    logits = next(llamacpp.sequence_logits(out, TOKENS, threads=2))
    ref = next(llamacpp.sequence_logits(f32_file, TOKENS, threads=2))
    # Random tiny models have flat logits where top-1 flips on any noise: compare whole logit vectors.
    corr = float(np.corrcoef(logits.ravel(), ref.ravel())[0, 1])
    assert corr >= (0.999 if qtype in ("F32", "F16", "BF16", "Q8_0") else 0.8), corr


def test_bits_per_weight_of_f32_and_q8_0(tmp_path, f32_file):
    assert bits_per_weight(read_gguf(f32_file)) == 32.0
    out = tmp_path / "q8.gguf"
    quantize(f32_file, out, "Q8_0", threads=2)
    assert bits_per_weight(read_gguf(out)) == pytest.approx(8.5)


def test_add_squares_is_the_per_column_sum_of_squares():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])
    total, rows = add_squares(torch.zeros(2, dtype=torch.float64), x)
    assert rows == 2 and total.tolist() == [10.0, 4.25]
    total, rows = add_squares(total, torch.tensor([[2.0, 2.0]]))
    assert rows == 1 and total.tolist() == [14.0, 8.25]


def test_imatrix_names_and_sizes_follow_the_gguf_tensors(f32_file):
    model = apply_plan(_model(), Plan(heads=((1, (0, 1)),), ffn=((0, tuple(range(256))),)))
    imatrix = collect_imatrix(model, torch.from_numpy(TOKENS).repeat(3, 1))
    shapes = tensor_shapes(f32_file)
    assert imatrix["token_embd.weight"].shape == (256,)  # tied: the output matmul's statistics
    assert imatrix["blk.0.ffn_down.weight"].shape == (256,)  # pruned to 256 channels
    assert imatrix["blk.1.attn_output.weight"].shape == (2 * 64,)  # 2 heads kept
    assert imatrix["blk.0.attn_q.weight"].shape == (shapes["blk.0.attn_q.weight"][0],)
    assert all((v >= 0).all() and np.isfinite(v).all() for v in imatrix.values())


def test_imatrix_reaches_the_quantizer(tmp_path, f32_file):
    imatrix = collect_imatrix(_model(), torch.from_numpy(TOKENS).repeat(2, 1))
    # A skewed importance makes the rounding choices visibly different.
    imatrix = {k: v * np.linspace(0.01, 100, v.size, dtype=np.float32) for k, v in imatrix.items()}
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    quantize(f32_file, plain, "Q4_K_M", threads=2)
    quantize(f32_file, weighted, "Q4_K_M", threads=2, imatrix=imatrix)
    a = {t.name: np.array(t.data) for t in read_gguf(plain).tensors}
    b = {t.name: np.array(t.data) for t in read_gguf(weighted).tensors}
    assert not np.array_equal(a["blk.0.attn_q.weight"], b["blk.0.attn_q.weight"])


def test_wrong_sized_imatrix_is_refused_before_llama_cpp(tmp_path, f32_file):
    with pytest.raises(EdgepruneError, match="has 7 values but the tensor has 256"):
        quantize(f32_file, tmp_path / "x.gguf", "Q4_K_M", threads=2,
                 imatrix={"blk.0.attn_q.weight": np.ones(7, np.float32)})
    assert not (tmp_path / "x.gguf").exists()


def test_recipes_override_only_the_tensors_k_quants_cannot_pack(tmp_path, embedded_tokenizer_spec):
    f32 = tmp_path / "narrow.gguf"  # hidden 320: not a multiple of 256; FFN 640 neither
    export_gguf(_model(hidden=320), embedded_tokenizer_spec, f32, "F32", Provenance("t", "0" * 64, {}), "t")
    shapes = tensor_shapes(f32)
    default, mixed = tmp_path / "default.gguf", tmp_path / "mixed.gguf"
    quantize(f32, default, "Q4_K_M", threads=2, overrides=RECIPES["default"].overrides(shapes))
    quantize(f32, mixed, "Q4_K_M", threads=2,
             overrides=RECIPES["q4_0-narrow-q5_0-output"].overrides(shapes))
    d, m = _types(default), _types(mixed)
    assert d["blk.0.attn_q.weight"] == "Q5_0"  # llama.cpp's own fallback for Q4_K
    assert m["blk.0.attn_q.weight"] == "Q4_0" and m["blk.1.ffn_down.weight"] == "Q4_0"
    assert m["token_embd.weight"] == "Q5_0"  # tied: the output matrix
    assert m["blk.0.attn_norm.weight"] == "F32"
    assert bits_per_weight(read_gguf(mixed)) < bits_per_weight(read_gguf(default))
