"""Quantization types, the importance matrix and per-tensor recipes, on tiny in-process models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.gguf_file import bits_per_weight, read_gguf
from edgeprune.models.streamed import DecoderStream
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import Plan
from edgeprune.quantize import QUANT_FTYPES, RECIPES, collect_imatrix, quantize, tensor_shapes
from edgeprune.quantize.imatrix import add_squares
from edgeprune.quantize.recipes import EffectiveBits, Recipe, effective_bits
from edgeprune.runtimes import llamacpp

TOKENS = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77]])
LONG = np.random.default_rng(0).integers(3, 49152, size=(1, 64))
EIGHT_BIT_OR_MORE = ("F32", "F16", "BF16", "Q8_0")


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


@pytest.fixture(scope="module")
def torch_logits() -> np.ndarray:
    with torch.no_grad():
        return _model()(input_ids=torch.from_numpy(LONG)).logits[0].numpy()


@pytest.mark.parametrize("qtype", list(QUANT_FTYPES))
def test_every_type_quantizes_and_loads(tmp_path, f32_file, torch_logits, qtype):
    out = tmp_path / f"{qtype}.gguf"
    quantize(f32_file, out, qtype, threads=2)
    types = _types(out)
    expected_attn_q = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q4_0": "Q4_0"}
    if qtype in expected_attn_q:
        assert types["blk.0.attn_q.weight"] == expected_attn_q[qtype]
    else:  # K-quant mixtures: K types only, since every width here is a multiple of 256
        assert all(t.endswith("_K") or t == "F32" for t in types.values()), types
    logits = next(llamacpp.sequence_logits(out, LONG, threads=2))
    if qtype in EIGHT_BIT_OR_MORE:
        # Random models have small top-1 margins (some < 0.01): 8-bit rounding flips a few.
        top1 = float((logits.argmax(-1) == torch_logits.argmax(-1)).mean())
        assert top1 >= 0.8, top1
    # Below 8 bits top-1 is a coin toss here: compare whole logit vectors.
    corr = float(np.corrcoef(logits.ravel(), torch_logits.ravel())[0, 1])
    assert corr >= (0.999 if qtype in EIGHT_BIT_OR_MORE else 0.8), corr


def test_bits_per_weight_of_f32_and_q8_0(tmp_path, f32_file):
    assert bits_per_weight(read_gguf(f32_file)) == 32.0
    assert effective_bits(f32_file) == EffectiveBits(weights=32.0, overall=32.0)
    out = tmp_path / "q8.gguf"
    quantize(f32_file, out, "Q8_0", threads=2)
    bits = effective_bits(out)
    assert bits.weights == pytest.approx(8.5)
    assert 8.5 < bits.overall < 8.6  # + the F32 norms


def test_add_squares_is_the_per_column_sum_of_squares():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])
    total, rows = add_squares(torch.zeros(2, dtype=torch.float64), x)
    assert rows == 2 and total.tolist() == [10.0, 4.25]
    total, rows = add_squares(total, torch.tensor([[2.0, 2.0]]))
    assert rows == 1 and total.tolist() == [14.0, 8.25]


def test_imatrix_names_and_sizes_follow_the_gguf_tensors(f32_file):
    stream = DecoderStream(ModuleStore(_model()), Plan(heads=((1, (0, 1)),), ffn=((0, tuple(range(256))),)))
    imatrix = collect_imatrix(stream, torch.from_numpy(TOKENS).repeat(3, 1))
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


def test_imatrix_is_the_mean_square_of_each_matmul_input():
    model = _model()
    windows = torch.from_numpy(LONG[:, :24].reshape(3, 8))  # 3 windows in batches of 2: one uneven batch
    imatrix = collect_imatrix(model, windows, batch_size=2)
    with torch.no_grad():
        hidden = model.model.embed_tokens(windows)
        attn_in = model.model.layers[0].input_layernorm(hidden)
        final = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]  # after the final norm
    np.testing.assert_allclose(imatrix["blk.0.attn_k.weight"], attn_in.square().mean(dim=(0, 1)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(imatrix["token_embd.weight"], final.square().mean(dim=(0, 1)).numpy(), rtol=1e-4)
    assert "output.weight" not in imatrix  # tied: no such tensor in the GGUF


def test_tied_output_statistics_reach_token_embd(tmp_path, f32_file):
    """llama.cpp weights token_embd's rounding with its entry (when the type uses weights, e.g. Q5_0)."""
    imatrix = collect_imatrix(_model(), torch.from_numpy(TOKENS).repeat(2, 1))
    imatrix = {k: v * np.linspace(0.01, 100, v.size, dtype=np.float32) for k, v in imatrix.items()}
    without = {k: v for k, v in imatrix.items() if k != "token_embd.weight"}
    recipe = RECIPES["q4_0-narrow-q5_0-output"].overrides(tensor_shapes(f32_file))
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    quantize(f32_file, a, "Q4_K_M", threads=2, imatrix=imatrix, overrides=recipe)
    quantize(f32_file, b, "Q4_K_M", threads=2, imatrix=without, overrides=recipe)
    ta = {t.name: t for t in read_gguf(a).tensors}
    tb = {t.name: t for t in read_gguf(b).tensors}
    assert ta["token_embd.weight"].tensor_type.name == "Q5_0"
    assert not np.array_equal(np.array(ta["token_embd.weight"].data), np.array(tb["token_embd.weight"].data))
    assert np.array_equal(np.array(ta["blk.0.attn_q.weight"].data), np.array(tb["blk.0.attn_q.weight"].data))


def test_imatrix_of_another_model_is_refused(tmp_path, f32_file):
    with pytest.raises(EdgepruneError, match="names a tensor of"):
        quantize(f32_file, tmp_path / "x.gguf", "Q4_K_M", threads=2,
                 imatrix={"model.layers.0.q_proj": np.ones(256, np.float32)})
    with pytest.raises(EdgepruneError, match="not finite"):
        quantize(f32_file, tmp_path / "x.gguf", "Q4_K_M", threads=2,
                 imatrix={"blk.0.attn_q.weight": np.full(256, np.nan, np.float32)})
    assert not (tmp_path / "x.gguf").exists()


def test_overrides_pick_the_first_matching_pattern_and_leave_the_rest(tmp_path, f32_file):
    out, plain = tmp_path / "o.gguf", tmp_path / "plain.gguf"
    quantize(f32_file, out, "Q4_K_M", threads=2,
             overrides=[(r"^blk\.0\.attn_v\.", "F16"), (r"attn_v", "Q8_0"), (r"ffn_up", "IQ4_NL")])
    quantize(f32_file, plain, "Q4_K_M", threads=2)
    types, mixture = _types(out), _types(plain)
    assert types["blk.0.attn_v.weight"] == "F16" and types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == types["blk.1.ffn_up.weight"] == "IQ4_NL"
    rest = {n for n in types if "attn_v" not in n and "ffn_up" not in n}
    assert {n: types[n] for n in rest} == {n: mixture[n] for n in rest}  # the mixture's own choices
    assert mixture["blk.0.ffn_up.weight"] != "IQ4_NL" and mixture["blk.1.attn_v.weight"] != "Q8_0"


def test_bad_overrides_are_refused(tmp_path, f32_file):
    with pytest.raises(EdgepruneError, match="not a valid regex"):
        quantize(f32_file, tmp_path / "x.gguf", "Q4_K_M", threads=2, overrides=[("attn_(v", "Q8_0")])
    with pytest.raises(EdgepruneError, match="Unknown ggml tensor type Q9_9"):
        quantize(f32_file, tmp_path / "x.gguf", "Q4_K_M", threads=2, overrides=[("attn_v", "Q9_9")])
    with pytest.raises(EdgepruneError, match="Unknown quantization type"):
        quantize(f32_file, tmp_path / "x.gguf", "Q4_K_XL", threads=2)


def test_narrow_recipe_touches_only_narrow_tensors(tmp_path, embedded_tokenizer_spec):
    """Hidden 256, FFN 640: only ffn_down's input width is not a multiple of 256."""
    config_model = _model()
    wide = LlamaForCausalLM(LlamaConfig(**(config_model.config.to_dict() | {"intermediate_size": 640}))).eval()
    f32 = tmp_path / "ffn640.gguf"
    export_gguf(wide, embedded_tokenizer_spec, f32, "F32", Provenance("t", "0" * 64, {}), "t")
    shapes = tensor_shapes(f32)
    overrides = RECIPES["iq4_nl-narrow"].overrides(shapes, "Q4_K_M")
    assert [p for p, _ in overrides] == [r"^blk\.0\.ffn_down\.weight$", r"^blk\.1\.ffn_down\.weight$"]
    out = tmp_path / "mixed.gguf"
    quantize(f32, out, "Q4_K_M", threads=2, overrides=overrides)
    types = _types(out)
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == "IQ4_NL"
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q6_K"


def test_recipe_overrides_from_shapes():
    shapes = {"token_embd.weight": (576, 49152), "blk.0.attn_q.weight": (576, 576), "blk.0.attn_v.weight": (576, 192),
              "blk.0.ffn_down.weight": (1536, 576), "blk.0.attn_norm.weight": (576,)}
    keep_v = RECIPES["iq4_nl-narrow-keep-v"].overrides(shapes, "Q4_K_M")
    assert keep_v == [(r"^blk\.0\.attn_q\.weight$", "IQ4_NL")]
    out = RECIPES["iq4_nl-narrow-q5_0-output"].overrides(shapes)
    assert out[0] == (r"^token_embd\.weight$", "Q5_0") and len(out) == 3
    untied = RECIPES["iq4_nl-narrow-q5_0-output"].overrides(shapes | {"output.weight": (576, 49152)})
    assert untied[0] == (r"^output\.weight$", "Q5_0") and len(untied) == 3  # token_embd: llama.cpp's choice
    both = RECIPES["iq4_nl-narrow-keep-v-q5_0-output"].overrides(shapes, "Q4_K_M")
    assert both == [(r"^token_embd\.weight$", "Q5_0"), (r"^blk\.0\.attn_q\.weight$", "IQ4_NL")]
    # Types whose blocks fit every width have no fallback to replace.
    assert RECIPES["iq4_nl-narrow"].overrides(shapes, "Q8_0") == []
    assert Recipe("x", "", output="Q8_0").overrides(shapes, "F16") == [(r"^token_embd\.weight$", "Q8_0")]
