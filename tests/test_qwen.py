"""Qwen2 / Qwen2.5 and Qwen3 beside Llama: tiny random models of the published configs (shrunk),
unpruned and pruned uniformly (fewer layers, one KV group less, a narrower FFN).

Oracles, as in test_export.py and test_family.py: llama.cpp's own convert_hf_to_gguf.py on the same
(pruned) HF directory for metadata and tensors, byte for byte; torch for the logits llama.cpp
reaches from our file (top-1 equal everywhere, max difference no worse than the converter's plus
1e-4 of the logits' spread, with an F32 KV cache); transformers for token ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import calibration_text, gguf_contents, llama_cpp_logits, run_converter, torch_logits
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.families import family_of
from edgeprune.gguf_file import read_gguf
from edgeprune.models.reference import open_weights
from edgeprune.models.source import ModelSource
from edgeprune.models.tokenizer import TokenizerSpec, pre_tokenizer_name
from edgeprune.prune import ModelShape, Plan, PlanError, apply_plan

TOKENS = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77, 6345, 2]])
CHANNELS = tuple(range(128))
# What each family's published small models look like, at toy width: Qwen2.5-0.5B (14 heads over 2 KV
# heads, head_dim 64 = hidden / heads and not in config.json, tied, theta 1e6) and Qwen3-0.6B (16 over
# 8, head_dim 128, twice hidden / heads, tied, theta 1e6).
FAMILIES = {
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),  # as published: no head_dim, it is derived
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}
PLANS = {
    "unpruned": Plan(),
    "depth": Plan(drop_layers=(1, 2)),
    "one KV group less": Plan(heads=tuple((l, (2, 3)) for l in range(4))),
    "narrower FFN": Plan(ffn=tuple((l, CHANNELS[::2]) for l in range(4))),
    "all three": Plan(drop_layers=(2,), heads=tuple((l, (0, 1)) for l in (0, 1, 3)),
                      ffn=tuple((l, CHANNELS[:64]) for l in (0, 1, 3))),
}


def tiny(family: str, *, tied: bool = True, vocab: int = 49152, seed: int = 0):
    """A random model of `family` whose logits spread over several units (as conftest.tiny_llama)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, **FAMILIES[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)  # Qwen2's q/k/v biases: large enough that a misplaced row shows
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def _hf_dir(model, tokenizer, directory):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_matches_the_converter_and_torch(tmp_path, family, plan_name, llama_cpp_src, embedded_reference):
    """Qwen2 with fewer heads than its width (q narrower than hidden) is written as `deci`, which the
    converter cannot write: there the bound is test_export.py's 1e-4 of the logits' spread."""
    from transformers import AutoTokenizer

    model = apply_plan(tiny(family, tied=plan_name != "depth"), PLANS[plan_name])
    assert type(model).__name__ == f"{family.capitalize()}ForCausalLM"
    hf_dir = _hf_dir(model, embedded_reference.tokenizer, tmp_path / "hf")
    # As the converter reads it: transformers gives a Qwen2 model's tokenizer Qwen's split, whatever its
    # tokenizer.json says (the spec names what the tokenizer object splits with).
    spec = TokenizerSpec.from_hf(AutoTokenizer.from_pretrained(hf_dir), model.config.vocab_size)
    ours = tmp_path / "ours.gguf"
    export_gguf(model, spec, ours, "F32", Provenance("t", "0" * 64, {}), "t")
    arch = read_gguf(ours).get_field("general.architecture").contents()
    expected = torch_logits(model, TOKENS)
    got = llama_cpp_logits(ours, TOKENS)
    spread = float(expected.max() - expected.min())
    assert spread > 5.0, "test model too flat for top-1 to mean anything"
    assert (expected.argmax(-1) == got.argmax(-1)).all()
    maxdiff = float(np.abs(expected - got).max())
    if family == "qwen2" and model.config.num_attention_heads * model.config.head_dim != model.config.hidden_size:
        assert arch == "deci" and maxdiff <= 1e-4 * spread, maxdiff
        return
    assert arch == family

    theirs = tmp_path / "theirs.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs, pre=spec.pre)  # a test vocabulary: no known hash
    prefixes = (f"{family}.", "tokenizer.", "general.architecture")
    our_fields, our_tensors = gguf_contents(ours, prefixes)
    their_fields, their_tensors = gguf_contents(theirs, prefixes)
    for key, value in their_fields.items():
        assert key in our_fields, f"we do not write {key}"
        assert our_fields[key] == value, key
    assert set(our_tensors) == set(their_tensors)
    for name, (shape, dtype, data) in their_tensors.items():
        assert our_tensors[name][:2] == (shape, dtype), name
        assert np.array_equal(our_tensors[name][2], data), name
    ref_maxdiff = float(np.abs(expected - llama_cpp_logits(theirs, TOKENS)).max())
    assert maxdiff <= ref_maxdiff + 1e-4 * spread, (maxdiff, ref_maxdiff)


# Layers of different shapes: `deci` for Qwen2 (biases permuted with their rows), refused for Qwen3.
PER_LAYER_PLANS = {
    "per-layer heads": Plan(heads=((0, (0, 2)), (1, (2, 3)), (3, (1,)))),
    "per-layer FFN": Plan(ffn=((0, CHANNELS[:32]), (2, CHANNELS[5:]))),
    "attention removed": Plan(heads=((2, ()),)),
    "MLP removed": Plan(ffn=((1, ()),)),
}


@pytest.mark.parametrize("plan_name", list(PER_LAYER_PLANS))
def test_qwen2_per_layer_plans_export_as_deci_and_match_torch(tmp_path, plan_name, embedded_tokenizer_spec):
    model = apply_plan(tiny("qwen2", tied=False), PER_LAYER_PLANS[plan_name])
    path = tmp_path / "deci.gguf"
    export_gguf(model, embedded_tokenizer_spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    assert read_gguf(path).get_field("general.architecture").contents() == "deci"
    expected, got = torch_logits(model, TOKENS), llama_cpp_logits(path, TOKENS)
    spread = float(expected.max() - expected.min())
    assert (expected.argmax(-1) == got.argmax(-1)).all()
    assert float(np.abs(expected - got).max()) <= 1e-4 * spread


def test_qwen2_biases_follow_their_heads():
    """Keeping KV group 1 keeps rows 32..63 of k and v and their biases; query heads 2 and 3 keep q's."""
    model = tiny("qwen2")
    pruned = apply_plan(model, PLANS["one KV group less"])
    for proj, rows in (("q_proj", slice(32, 64)), ("k_proj", slice(16, 32)), ("v_proj", slice(16, 32))):
        old, new = getattr(model.model.layers[1].self_attn, proj), getattr(pruned.model.layers[1].self_attn, proj)
        torch.testing.assert_close(new.bias, old.bias[rows])
        torch.testing.assert_close(new.weight, old.weight[rows])


def test_qwen3_per_layer_plans_are_refused_in_one_sentence():
    shape = ModelShape.from_config(tiny("qwen3").config)
    assert (shape.family, shape.per_layer) == ("qwen3", False)
    for plan in PER_LAYER_PLANS.values():
        with pytest.raises(PlanError, match="llama.cpp runs qwen3 models with one shape for every layer"):
            plan.validate(shape)
    PLANS["all three"].validate(shape)
    assert ModelShape.from_config(tiny("qwen2").config).per_layer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_gguf_source_reads_back_the_models_tensors(tmp_path, family, embedded_tokenizer_spec):
    """Our F32 GGUF opened as a source: the family's config, and every tensor (biases, Q/K norms) as stored."""
    model = tiny(family, tied=False)
    path = tmp_path / f"{family}.gguf"
    export_gguf(model, embedded_tokenizer_spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    store = open_weights(ModelSource("gguf", str(path), path.stem), trust_remote_code=False)
    assert family_of(store.config).name == family and store.config.model_type == family
    assert ModelShape.from_config(store.config) == ModelShape.from_config(model.config)
    assert not store.config.tie_word_embeddings
    state = model.state_dict()
    assert sorted(store.names()) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(store.read(name), tensor), name


def _qwen_tokenizer(vocab: int):
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer (llama.cpp: "qwen2") and its chat markers,
    trained in-process on mixed text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgeprune.models.tokenizer import PRE_TOKENIZERS

    split = PRE_TOKENIZERS["qwen2"]["pretokenizers"][0]["pattern"]["Regex"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    from test_tokenizer import TEXTS

    tok.train_from_iterator(calibration_text().split("\n\n") + TEXTS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])


def test_qwen2_pre_tokenizer_is_recognised_and_llama_cpp_tokenizes_like_transformers(tmp_path):
    import llama_cpp
    from test_tokenizer import TEXTS

    vocab = 700
    tokenizer = _qwen_tokenizer(vocab)
    tokenizer.save_pretrained(tmp_path / "tok")
    assert pre_tokenizer_name(json.loads((tmp_path / "tok" / "tokenizer.json").read_text())) == "qwen2"
    spec = TokenizerSpec.from_hf(tokenizer, vocab)
    assert spec.pre == "qwen2"
    path = tmp_path / "qwen2.gguf"
    export_gguf(tiny("qwen2", vocab=vocab), spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    digits = "Version 12345 of 2026: 3.14159 and 1000000 units."  # Qwen2 splits digits one by one
    for text in TEXTS + [digits, "<|im_start|>user\nHi 42<|im_end|>\n"]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == expected, text
    assert all(len(tokenizer.decode([i])) == 1 for i in tokenizer(digits)["input_ids"]
               if tokenizer.decode([i]).strip().isdigit())


def test_onnx_runtime_refuses_a_qwen_model_in_one_sentence(tmp_path):
    from edgeprune.models.weights import ModuleStore
    from edgeprune.runtimes.onnx.llama import write_onnx
    from edgeprune.runtimes.onnx.weights import WEIGHTS

    with pytest.raises(EdgepruneError, match="llama family only so far, not qwen2"):
        write_onnx(ModuleStore(tiny("qwen2")), Plan(), tmp_path / "m.onnx", WEIGHTS["F32"],
                   Provenance("t", "0" * 64, {}), "t")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory) -> dict:
    """Tiny Qwen2 and Qwen3 checkpoints with a Qwen-style tokenizer, and a calibration file."""
    root = tmp_path_factory.mktemp("qwen")
    out = {"calib": root / "calib.txt"}
    out["calib"].write_text(calibration_text())
    for family in FAMILIES:
        out[family] = _hf_dir(tiny(family, tied=False, vocab=700), _qwen_tokenizer(700), root / family)
    return out


def _prune(tmp_path, qwen_dirs, family: str, plan: str, cache_dir, *extra: str):
    from test_cli import edgeprune

    (tmp_path / "plan.toml").write_text(plan)
    out = tmp_path / "out"
    return edgeprune("prune", "--model", str(qwen_dirs[family]), "--plan", str(tmp_path / "plan.toml"), "-o", str(out),
                     "-p", "quick", "--calib", str(qwen_dirs["calib"]), "--cache-dir", str(cache_dir), *extra), out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_writes_the_familys_gguf_and_a_plain_transformers_checkpoint(tmp_path, qwen_dirs, family, cache_dir):
    from transformers import AutoModelForCausalLM

    from edgeprune.prune.modules import materialize

    proc, out = _prune(tmp_path, qwen_dirs, family, "drop_layers = [1]\n[all]\nheads = 2\nffn = 64\n", cache_dir)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "plan.json").read_text())
    # Qwen2's own graph sizes q by the hidden width: 2 of 4 heads make it `deci`.
    assert record["architecture"] == {"qwen2": "deci", "qwen3": "qwen3"}[family]
    reader = read_gguf(out / f"model-{family}-Q4_K_M.gguf")
    arch = record["architecture"]
    assert reader.get_field(f"{arch}.block_count").contents() == 3
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert type(hf).__name__ == f"{family.capitalize()}ForCausalLM"
    store = open_weights(ModelSource("hf_dir", str(qwen_dirs[family]), family))
    expected = materialize(store, Plan.from_dict(record["plan"]))
    tokens = torch.tensor([[1, 50, 243, 28, 330, 17, 33, 34]])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, expected(tokens).logits)
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["mean_kld"] > 0 and report["hf_checkpoint"] == "hf"


@pytest.mark.slow
def test_prune_refuses_a_per_layer_plan_for_qwen3_before_any_work(tmp_path, qwen_dirs, cache_dir):
    from test_cli import assert_clean_error

    proc, out = _prune(tmp_path, qwen_dirs, "qwen3", "[layers.2]\nheads = 2\n", cache_dir)
    assert_clean_error(proc, "llama.cpp runs qwen3 models with one shape for every layer")
    assert not out.exists()
    proc, out = _prune(tmp_path, qwen_dirs, "qwen2", "[layers.2]\nheads = 2\n", cache_dir, "--runtime", "onnxruntime")
    assert_clean_error(proc, "edgeprune writes llama models for onnxruntime so far, not qwen2 models")
    assert not out.exists()


@pytest.mark.slow
def test_qwen2_builds_a_bundle_that_verifies(tmp_path, qwen_dirs, cache_dir):
    """A budget the unpruned model meets: the build, its bundle and verify on a Qwen2 checkpoint."""
    from conftest import build_verified_bundle

    report, reader = build_verified_bundle(tmp_path / "bundle", qwen_dirs["qwen2"], qwen_dirs["calib"], cache_dir)
    assert report["artifact"] == "model-qwen2-Q4_K_M.gguf"
    assert reader.get_field("general.architecture").contents() == "qwen2"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "qwen2"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_gguf_source_brings_its_tokenizer(tmp_path, qwen_dirs, family):
    """A Qwen GGUF as --model: the family's config, and a tokenizer that splits as the original does."""
    from test_tokenizer import TEXTS
    from transformers import AutoTokenizer

    from edgeprune.models import load_reference, resolve_source

    tokenizer = AutoTokenizer.from_pretrained(qwen_dirs[family])
    path = tmp_path / f"{family}.gguf"
    export_gguf(tiny(family, vocab=700), TokenizerSpec.from_hf(tokenizer, 700), path, "F16",
                Provenance("t", "0" * 64, {}), "t")
    ref = load_reference(resolve_source(str(path)), tmp_path / "cache")
    assert ref.config.model_type == family and ref.tokenizer_spec.pre == "qwen2"
    for text in TEXTS + ["<|im_start|>user\nPump 12: 3.14 bar<|im_end|>"]:
        assert ref.tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(
            text, add_special_tokens=False)["input_ids"], text
