"""Phi-3 / Phi-3.5-mini / Phi-4-mini beside Llama: tiny random models of the published configs
(shrunk), unpruned and pruned the ways llama.cpp's phi3 graph can hold (fewer layers, a narrower FFN
alike in every layer).

Oracles as in test_qwen.py: llama.cpp's convert_hf_to_gguf.py on the same (pruned) HF directory,
byte for byte (q/k/v and gate/up stay fused, as the converter keeps them); torch for the logits
llama.cpp reaches from our file; transformers for token ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import calibration_text, gguf_contents, llama_cpp_logits, run_converter, torch_logits
from edgeprune.export import Provenance, export_gguf
from edgeprune.gguf_file import read_gguf
from edgeprune.models.reference import open_weights
from edgeprune.models.source import ModelSource
from edgeprune.models.tokenizer import PRE_TOKENIZERS, TokenizerSpec
from edgeprune.prune import ModelShape, Plan, PlanError, apply_plan

TOKENS = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77, 6345, 2]])
CHANNELS = tuple(range(128))
# Phi-3-mini-4k (whole-head RoPE, untied), Phi-4-mini (RoPE over 3/4 of each head, tied) and the
# long-context ones (longrope: short and long frequency factors, a stretched context), at toy width.
VARIANTS = {
    "phi-3-mini": dict(partial=1.0, tied=False),
    "phi-4-mini": dict(partial=0.75, tied=True),
    "longrope": dict(partial=0.75, tied=False, longrope=True),
}
PLANS = {
    "unpruned": Plan(),
    "depth": Plan(drop_layers=(1, 2)),
    "narrower FFN": Plan(ffn=tuple((l, CHANNELS[::2]) for l in range(4))),
    "both": Plan(drop_layers=(2,), ffn=tuple((l, CHANNELS[:64]) for l in (0, 1, 3))),
}


def tiny(*, partial: float = 1.0, tied: bool = False, longrope: bool = False, vocab: int = 49152, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra: dict = {}
    if longrope:
        half = int(16 * partial) // 2
        extra = dict(max_position_embeddings=1024, rope_scaling={
            "rope_type": "longrope", "long_factor": [1.0 + i / half for i in range(half)],
            "short_factor": [1.0 + 0.1 * i for i in range(half)]})
    config = AutoConfig.for_model(
        "phi3", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, **({"max_position_embeddings": 256} | extra), original_max_position_embeddings=256,
        rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied,
        partial_rotary_factor=partial)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def _hf_dir(model, tokenizer, directory):
    """As Phi-4-mini ships it: tokenizer_config.json names GPT2Tokenizer (the converter reads tokenizer.json)."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"tokenizer_class": "GPT2Tokenizer"}))
    return directory


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_equals_the_converters_and_matches_torch(tmp_path, variant, plan_name, llama_cpp_src,
                                                        embedded_reference):
    from transformers import AutoTokenizer

    model = apply_plan(tiny(**VARIANTS[variant]), PLANS[plan_name])
    assert type(model).__name__ == "Phi3ForCausalLM"
    hf_dir = _hf_dir(model, embedded_reference.tokenizer, tmp_path / "hf")
    spec = TokenizerSpec.from_hf(AutoTokenizer.from_pretrained(hf_dir), model.config.vocab_size)
    ours = tmp_path / "ours.gguf"
    export_gguf(model, spec, ours, "F32", Provenance("t", "0" * 64, {}), "t")
    theirs = tmp_path / "theirs.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs, pre=spec.pre)  # a test vocabulary: no known hash

    our_fields, our_tensors = gguf_contents(ours, ("phi3.", "tokenizer.", "general.architecture"))
    their_fields, their_tensors = gguf_contents(theirs, ("phi3.", "tokenizer.", "general.architecture"))
    assert our_fields["general.architecture"] == "phi3"
    for key, value in their_fields.items():
        assert key in our_fields, f"we do not write {key}"
        assert our_fields[key] == value, key
    assert set(our_tensors) == set(their_tensors)
    assert ("blk.0.attn_qkv.weight" in our_tensors and "blk.0.ffn_gate.weight" not in our_tensors)
    for name, (shape, dtype, data) in their_tensors.items():
        assert our_tensors[name][:2] == (shape, dtype), name
        assert np.array_equal(our_tensors[name][2], data), name

    expected = torch_logits(model, TOKENS)
    got, reference = llama_cpp_logits(ours, TOKENS), llama_cpp_logits(theirs, TOKENS)
    spread = float(expected.max() - expected.min())
    assert spread > 5.0, "test model too flat for top-1 to mean anything"
    assert (expected.argmax(-1) == got.argmax(-1)).all()
    ref_maxdiff = float(np.abs(expected - reference).max())
    assert float(np.abs(expected - got).max()) <= ref_maxdiff + 1e-4 * spread


def test_fused_projections_keep_the_same_rows_of_each_part():
    """FFN channels keep rows c of gate and ffn + c of up in gate_up_proj; layers renumber."""
    model = tiny()
    pruned = apply_plan(model, Plan(drop_layers=(0,), ffn=tuple((l, (3, 7, 100)) for l in (1, 2, 3))))
    old, new = model.model.layers[1].mlp, pruned.model.layers[0].mlp
    torch.testing.assert_close(new.gate_up_proj.weight, old.gate_up_proj.weight[[3, 7, 100, 131, 135, 228]])
    torch.testing.assert_close(new.down_proj.weight, old.down_proj.weight[:, [3, 7, 100]])


def test_heads_and_layers_of_different_shapes_are_refused_in_one_sentence():
    shape = ModelShape.from_config(tiny().config)
    assert (shape.family, shape.per_layer, shape.head_pruning) == ("phi3", False, False)
    with pytest.raises(PlanError, match="llama.cpp's phi3 graph needs every query head"):
        Plan(heads=tuple((l, (0, 1)) for l in range(4))).validate(shape)
    with pytest.raises(PlanError, match="llama.cpp runs phi3 models with one shape for every layer"):
        Plan(ffn=((1, CHANNELS[:64]),)).validate(shape)
    PLANS["both"].validate(shape)


def test_the_search_and_structured_methods_leave_heads_alone():
    from edgeprune.analysis import Importance
    from edgeprune.config import load_profile
    from edgeprune.errors import EdgepruneError
    from edgeprune.search.space import SearchSpace, State
    from edgeprune.structured import STRUCTURED_METHODS, StructuredSettings

    shape = ModelShape.from_config(tiny().config)
    importance = Importance([0.5, 0.1, 0.2, 0.9], [[1.0] * 4] * 4, [[float(c % 5) for c in range(128)]] * 4,
                            attention_scores=[0.5] * 4)
    space = SearchSpace(shape, importance, load_profile("default").search)
    assert space.narrower(State(0)) == [] and space.without_attention(State(0)) is None
    with pytest.raises(EdgepruneError, match="--head-ratio removes query heads, but llama.cpp's phi3 graph"):
        STRUCTURED_METHODS["flap"].check(StructuredSettings(method="flap", head_ratio=0.25), shape)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_gguf_source_reads_back_the_models_config_and_tensors(tmp_path, variant, embedded_tokenizer_spec):
    from edgeprune.export.rope import rope_parameters

    model = tiny(**VARIANTS[variant])
    path = tmp_path / "phi3.gguf"
    export_gguf(model, embedded_tokenizer_spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    store = open_weights(ModelSource("gguf", str(path), "phi3"))
    assert store.config.model_type == "phi3" and store.config.tie_word_embeddings == model.config.tie_word_embeddings
    ours, theirs = rope_parameters(store.config), rope_parameters(model.config)
    for key in ("rope_type", "partial_rotary_factor", "long_factor", "short_factor"):
        assert ours.get(key) == pytest.approx(theirs.get(key)), key
    tied = model.config.tie_word_embeddings
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(store.names()) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(store.read(name), tensor), name
    from edgeprune.prune.modules import materialize

    with torch.no_grad():
        torch.testing.assert_close(materialize(store)(torch.from_numpy(TOKENS)).logits, model(
            torch.from_numpy(TOKENS)).logits)


def _gpt4o_tokenizer(vocab: int):
    """A byte-level BPE tokenizer with Phi-4-mini's (o200k) pre-tokenizer, trained in-process."""
    from test_tokenizer import TEXTS
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = PRE_TOKENIZERS["gpt-4o"]["pretokenizers"][0]["pattern"]["Regex"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(calibration_text().split("\n\n") + TEXTS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])


def test_phi4_mini_pre_tokenizer_is_recognised_and_llama_cpp_tokenizes_like_transformers(tmp_path):
    import llama_cpp
    from test_tokenizer import TEXTS

    vocab = 800
    tokenizer = _gpt4o_tokenizer(vocab)
    spec = TokenizerSpec.from_hf(tokenizer, vocab)
    assert spec.pre == "gpt-4o"
    path = tmp_path / "phi4.gguf"
    export_gguf(tiny(partial=0.75, tied=True, vocab=vocab), spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    cases = "CamelCase HTTPServer iPhone don't SHOUTING'S 12345 x/y/z\n<|user|>Hi<|end|>"
    for text in TEXTS + [cases]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == expected, text


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    (root / "calib.txt").write_text(calibration_text())
    model = tiny(partial=0.75, tied=True, vocab=800)
    model.save_pretrained(root / "phi4-mini")
    _gpt4o_tokenizer(800).save_pretrained(root / "phi4-mini")
    return root


@pytest.mark.slow
def test_prune_narrows_the_ffn_by_importance_and_writes_a_plain_transformers_checkpoint(tmp_path, phi_dir, cache_dir):
    from test_cli import assert_clean_error, edgeprune
    from transformers import AutoModelForCausalLM

    from edgeprune.prune.modules import materialize

    def prune(plan: str, *extra: str):
        (tmp_path / "plan.toml").write_text(plan)
        return edgeprune("prune", "--model", str(phi_dir / "phi4-mini"), "--plan", str(tmp_path / "plan.toml"),
                         "-o", str(tmp_path / "out"), "-p", "quick", "--calib", str(phi_dir / "calib.txt"),
                         "--cache-dir", str(cache_dir), *extra)

    proc = prune("drop_layers = [1]\n[all]\nffn = 64\n")  # which channels: wanda-sp over the fused gate_up
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    record = json.loads((out / "plan.json").read_text())
    assert record["architecture"] == "phi3" and record["layers"] == [{"n_head": 4, "n_head_kv": 2, "ffn": 64}] * 3
    reader = read_gguf(out / "model-phi4-mini-Q4_K_M.gguf")
    assert reader.get_field("phi3.feed_forward_length").contents() == 64
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    expected = materialize(open_weights(ModelSource("hf_dir", str(phi_dir / "phi4-mini"), "phi4-mini")),
                           Plan.from_dict(record["plan"]))
    tokens = torch.tensor([[1, 50, 243, 28, 330, 17, 33, 34]])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, expected(tokens).logits)

    proc = prune("[all]\nheads = 2\n", "--force")
    assert_clean_error(proc, "llama.cpp's phi3 graph needs every query head")
    proc = edgeprune("prune", "--model", str(phi_dir / "phi4-mini"), "--method", "flap", "--ffn-ratio", "0.5",
                     "--ffn-multiple", "32", "-o", str(tmp_path / "flap"), "-p", "quick", "--calib",
                     str(phi_dir / "calib.txt"), "--cache-dir", str(cache_dir))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "flap" / "plan.json").read_text())["layers"] == [
        {"n_head": 4, "n_head_kv": 2, "ffn": 64}] * 4
