"""Gemma 3 (text) beside Llama and Qwen: a tiny random model with the published layer pattern (five
sliding-window layers, then a global one) and an 8-token window the 18-token sequence outruns,
unpruned and pruned uniformly.

Oracles as in test_qwen.py: llama.cpp's converter on the same (pruned) HF directory for metadata and
tensors, byte for byte (its norms stored as 1 + weight); torch for the logits llama.cpp reaches from
our file. The converter writes no layer pattern (llama.cpp then assumes every sixth layer global),
which is wrong once layers are removed: depth plans are checked against torch only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import gguf_contents, llama_cpp_logits, run_converter, torch_logits
from edgeprune.export import Provenance, export_gguf
from edgeprune.families import family_of
from edgeprune.gguf_file import read_gguf
from edgeprune.models.reference import open_weights
from edgeprune.models.source import ModelSource
from edgeprune.models.tokenizer import TokenizerSpec
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import ModelShape, Plan, PlanError, apply_plan
from edgeprune.prune.apply import pruned_config
from edgeprune.prune.modules import materialize

GGUF_KEYS = ("gemma3.", "tokenizer.", "general.architecture")  # compared with the converter's
TOKENS = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77, 6345, 2]])
S, G = "sliding_attention", "full_attention"
LAYER_TYPES = [S, S, S, S, S, G]
LAYERS = range(len(LAYER_TYPES))
CHANNELS = tuple(range(128))
# Plans the converter writes correctly (every layer kept), and depth plans it does not.
PLANS = {
    "unpruned": Plan(),
    "one KV group less": Plan(heads=tuple((l, (2, 3)) for l in LAYERS)),
    "narrower FFN": Plan(ffn=tuple((l, CHANNELS[::2]) for l in LAYERS)),
}
DEPTH_PLANS = {
    "global layer dropped": Plan(drop_layers=(5,)),
    # [S, S, S, S, G]: llama.cpp's default pattern would make the last layer sliding.
    "all three": Plan(drop_layers=(0,), heads=tuple((l, (0, 1)) for l in LAYERS[1:]),
                      ffn=tuple((l, CHANNELS[:64]) for l in LAYERS[1:])),
}


def tiny(*, vocab: int = 49152, seed: int = 0):
    """A random Gemma 3 whose logits spread over several units; norm weights near 0 (they scale by 1 + w)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        layer_types=LAYER_TYPES, sliding_window=8, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={G: {"rope_type": "default", "rope_theta": 1_000_000.0},
                         S: {"rope_type": "default", "rope_theta": 10_000.0}},
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def _export(model, tokenizer, tmp_path):
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    spec = TokenizerSpec.from_hf(tokenizer, model.config.vocab_size)
    ours = tmp_path / "ours.gguf"
    export_gguf(model, spec, ours, "F32", Provenance("t", "0" * 64, {}), "t")
    return hf_dir, spec, ours


def _check_logits(expected: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    spread = float(expected.max() - expected.min())
    assert spread > 5.0, "test model too flat for top-1 to mean anything"
    assert (expected.argmax(-1) == got.argmax(-1)).all()
    return float(np.abs(expected - got).max()), spread


def _pattern(path) -> list[bool]:
    return [bool(x) for x in read_gguf(path).get_field("gemma3.attention.sliding_window_pattern").contents()]


def test_the_window_matters():
    """The 18-token sequence outruns the 8-token window: without it the logits differ."""
    model = tiny()
    full = tiny()
    full.config.sliding_window = 64
    for layer in full.model.layers:
        layer.self_attn.sliding_window = 64
    assert not np.allclose(torch_logits(model, TOKENS), torch_logits(full, TOKENS), atol=1e-3)


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_export_matches_the_converter_and_torch(tmp_path, plan_name, llama_cpp_src, embedded_reference):
    model = apply_plan(tiny(), PLANS[plan_name])
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.layer_types == LAYER_TYPES
    hf_dir, spec, ours = _export(model, embedded_reference.tokenizer, tmp_path)
    maxdiff, spread = _check_logits(torch_logits(model, TOKENS), llama_cpp_logits(ours, TOKENS))

    theirs = tmp_path / "theirs.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs, pre=spec.pre)  # a test vocabulary: no known hash
    our_fields, our_tensors = gguf_contents(ours, GGUF_KEYS)
    their_fields, their_tensors = gguf_contents(theirs, GGUF_KEYS)
    for key, value in their_fields.items():
        assert key in our_fields, f"we do not write {key}"
        assert our_fields[key] == value, key
    # Ours states the pattern the converter leaves to llama.cpp's default (True: sliding).
    assert "gemma3.attention.sliding_window_pattern" not in their_fields
    assert _pattern(ours) == [t == S for t in LAYER_TYPES]
    assert set(our_tensors) == set(their_tensors)
    for name, (shape, dtype, data) in their_tensors.items():
        assert our_tensors[name][:2] == (shape, dtype), name
        assert np.array_equal(our_tensors[name][2], data), name
    ref_maxdiff = float(np.abs(torch_logits(model, TOKENS) - llama_cpp_logits(theirs, TOKENS)).max())
    assert maxdiff <= ref_maxdiff + 1e-4 * spread, (maxdiff, ref_maxdiff)


@pytest.fixture(scope="module")
def converter_error(tmp_path_factory, llama_cpp_src, embedded_reference) -> float:
    """How far llama.cpp's logits from the converter's file of the unpruned model are from torch's:
    its own arithmetic for this family (about 3e-4 of the spread here, GELU included)."""
    model = tiny()
    hf_dir, spec, _ = _export(model, embedded_reference.tokenizer, tmp_path_factory.mktemp("gemma3"))
    theirs = hf_dir.parent / "theirs.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs, pre=spec.pre)
    return float(np.abs(torch_logits(model, TOKENS) - llama_cpp_logits(theirs, TOKENS)).max())


@pytest.mark.parametrize("plan_name", list(DEPTH_PLANS))
def test_depth_plans_write_the_kept_layers_pattern_and_match_torch(tmp_path, plan_name, embedded_reference,
                                                                   converter_error):
    """Against torch only, within the unpruned model's converter error plus 1e-4 of the spread: the
    converter's file of these models would lack the pattern (see above)."""
    plan = DEPTH_PLANS[plan_name]
    model = apply_plan(tiny(), plan)
    kept = [t for i, t in enumerate(LAYER_TYPES) if i not in plan.drop_layers]
    assert model.config.layer_types == kept
    _, _, ours = _export(model, embedded_reference.tokenizer, tmp_path)
    assert _pattern(ours) == [t == S for t in kept]
    maxdiff, spread = _check_logits(torch_logits(model, TOKENS), llama_cpp_logits(ours, TOKENS))
    assert maxdiff <= converter_error + 1e-4 * spread, (maxdiff, converter_error)


@pytest.mark.parametrize("plan", list(PLANS.values()) + list(DEPTH_PLANS.values()), ids=list(PLANS) + list(DEPTH_PLANS))
def test_the_streamed_pass_computes_the_pruned_model(plan):
    """materialize loads each layer through DecoderStream (embedding scale, each layer's own attention
    type, mask and RoPE); transformers' model of the pruned config with the plan's slices is the oracle."""
    from edgeprune.models.streamed import DecoderStream, SequentialPass

    model = tiny()
    store = ModuleStore(model)
    ours = materialize(store, plan)
    config = pruned_config(model.config, plan)
    assert config.layer_types == ours.config.layer_types
    expected = type(model)(config).eval()
    expected.load_state_dict(ours.state_dict())
    tokens = torch.from_numpy(TOKENS)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, expected(tokens).logits, rtol=0, atol=0)
    # The sequential pass's last hidden states are the model's, before the final norm.
    stream = DecoderStream(store, plan)
    hidden = SequentialPass(stream, tokens).run()[0]
    torch.testing.assert_close(hidden, _before_norm(expected, tokens))


def _before_norm(model, tokens: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: captured.update(h=args[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return captured["h"]


def test_a_gguf_source_reads_back_the_models_tensors(tmp_path, embedded_tokenizer_spec):
    """Our F32 GGUF opened as a source: Gemma 3's config (pattern, window, both RoPE bases) and every
    tensor as transformers holds it (norms shifted back)."""
    model = tiny()
    path = tmp_path / "gemma3.gguf"
    export_gguf(model, embedded_tokenizer_spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    store = open_weights(ModelSource("gguf", str(path), path.stem), trust_remote_code=False)
    config = store.config
    assert family_of(config).name == "gemma3" and config.model_type == "gemma3_text"
    assert ModelShape.from_config(config) == ModelShape.from_config(model.config)
    assert config.layer_types == LAYER_TYPES and config.sliding_window == 8
    assert config.rope_parameters == model.config.rope_parameters
    source = ModuleStore(model)  # tied: no lm_head
    assert sorted(store.names()) == sorted(source.names())
    for name in source.names():
        torch.testing.assert_close(store.read(name), source.read(name), rtol=0, atol=1e-6, msg=name)
    reread = materialize(store)
    torch.testing.assert_close(torch.from_numpy(torch_logits(reread, TOKENS)),
                               torch.from_numpy(torch_logits(model, TOKENS)))


def test_layers_of_different_shapes_are_refused_in_one_sentence():
    """llama.cpp has no per-layer Gemma 3 graph: per-layer heads or widths, or a removed sublayer, are refused."""
    shape = ModelShape.from_config(tiny().config)
    assert (shape.family, shape.per_layer) == ("gemma3", False)
    for plan in (Plan(heads=((0, (0, 2)),)), Plan(ffn=((1, CHANNELS[:32]),)), Plan(heads=((2, ()),))):
        with pytest.raises(PlanError, match="llama.cpp runs gemma3 models with one shape for every layer"):
            plan.validate(shape)
    DEPTH_PLANS["all three"].validate(shape)


def test_reference_log_probs_soft_cap_the_logits():
    """The streamed reference (evaluation, KL) caps logits as Gemma3ForCausalLM does."""
    from edgeprune.evaluate import reference_log_probs

    model = tiny()
    model.config.final_logit_softcapping = 3.0
    tokens = torch.from_numpy(TOKENS)
    with torch.no_grad():
        expected = torch.log_softmax(model(tokens).logits.float(), -1)
    got = torch.from_numpy(reference_log_probs(ModuleStore(model), tokens))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_soft_capped_logits_match_llama_cpp(tmp_path, embedded_tokenizer_spec, converter_error):
    """final_logit_softcapping is written and llama.cpp caps as transformers does."""
    model = tiny()
    model.config.final_logit_softcapping = 4.0
    path = tmp_path / "capped.gguf"
    export_gguf(model, embedded_tokenizer_spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
    assert read_gguf(path).get_field("gemma3.final_logit_softcapping").contents() == 4.0
    expected = torch_logits(model, TOKENS)
    assert np.abs(expected).max() < 4.0
    maxdiff, spread = _check_logits(expected, llama_cpp_logits(path, TOKENS))
    assert maxdiff <= converter_error + 1e-4 * spread, (maxdiff, converter_error)


def test_layer_by_layer_scores_equal_whole_model_scores():
    """Structured importance one layer at a time (the streamed pass) equals it on the whole model."""
    from test_structured_scores import _states_methods, _units
    from torch.testing import assert_close

    from edgeprune.analysis.layerwise import analyse_layerwise
    from edgeprune.analysis.whole_model import analyse_model

    model = tiny(vocab=256)
    windows = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(1))
    layer_methods, unit_methods = _states_methods(), _units("weights", "activations")
    whole = analyse_model(model, windows, layer_methods, unit_methods, batch_size=3)
    layerwise = analyse_layerwise(model, windows, layer_methods, unit_methods, batch_size=3)
    assert set(layerwise.layer_scores) == set(whole.layer_scores)
    for key, scores in whole.layer_scores.items():
        assert_close(layerwise.layer_scores[key], scores)
    for name, per_layer in whole.unit_scores.items():
        for mine, ref in zip(layerwise.unit_scores[name], per_layer, strict=True):
            assert_close((mine.heads, mine.kv_groups, mine.channels), (ref.heads, ref.kv_groups, ref.channels))


# --- a Gemma tokenizer (SentencePiece) and a multimodal checkpoint, as Gemma 3 4B ships ------------

CHAT = "<start_of_turn>user\nPump 12: 3.14 bar<end_of_turn>"


def _gemma_tokenizer(directory):
    """A SentencePiece BPE model trained here the way Gemma's is (byte fallback, split digits, no
    "▁" before the text, <pad> <eos> <bos> <unk> first, turn markers as user-defined pieces), and
    transformers' GemmaTokenizer of it: what a Gemma checkpoint's tokenizer.model and tokenizer.json are."""
    import sentencepiece as spm
    from test_family import _corpus
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "sp"), vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=False, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "sp.model"))
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab, skip_tokens={"<unk>", "<bos>", "<eos>",
                                                                                          "<pad>"}))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    assert len(tokenizer) == sp.vocab_size()
    return tokenizer, directory / "sp.model"


def _multimodal(text_model):
    """Gemma 3 4B's layout: Gemma3ForConditionalGeneration, a (tiny) SigLIP vision tower beside the
    language model, whose weights are `text_model`'s."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text_model.config.to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text_model.model.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    """Checkpoint directories as users have them: a text-only Gemma 3 (1B's layout) and a multimodal
    one (4B's), the same language model, each with tokenizer.model and tokenizer.json."""
    from test_family import _save_hf_dir

    from conftest import calibration_text

    root = tmp_path_factory.mktemp("gemma3-dirs")
    tokenizer, sp_path = _gemma_tokenizer(root / "spm")
    text = tiny(vocab=len(tokenizer))
    out = {"calib": root / "calib.txt", "text_model": text}
    out["calib"].write_text(calibration_text())
    for name, model in (("text", text), ("multimodal", _multimodal(text))):
        # As the hub's Gemma 3 repos (saved by transformers 4): added tokens listed in tokenizer_config.json.
        out[name] = _save_hf_dir(model, tokenizer, sp_path, root / name, "transformers4")
    return out


def test_a_gemma_tokenizer_is_written_as_the_converter_writes_it(tmp_path, gemma_dirs, llama_cpp_src):
    """SentencePiece vocabulary, scores, types and flags (no space prefix) equal the converter's, and
    llama.cpp splits text (turn markers included) as transformers does."""
    import llama_cpp
    from test_tokenizer import TEXTS
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dirs["text"])
    spec = TokenizerSpec.from_hf(tokenizer, len(tokenizer))
    assert (spec.model, spec.add_space_prefix) == ("llama", False)
    ours = tmp_path / "ours.gguf"
    export_gguf(gemma_dirs["text_model"], spec, ours, "F32", Provenance("t", "0" * 64, {}), "t")
    theirs = tmp_path / "theirs.gguf"
    run_converter(llama_cpp_src, gemma_dirs["text"], theirs)
    our_fields, _ = gguf_contents(ours, GGUF_KEYS)
    their_fields, _ = gguf_contents(theirs, GGUF_KEYS)
    tokenizer_keys = [k for k in their_fields if k.startswith("tokenizer.ggml.")]
    assert "tokenizer.ggml.add_space_prefix" in tokenizer_keys and "tokenizer.ggml.scores" in tokenizer_keys
    for key in tokenizer_keys:
        assert our_fields[key] == their_fields[key], key

    vocab = llama_cpp.Llama(str(ours), vocab_only=True, verbose=False)
    try:
        for text in TEXTS + [CHAT]:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert vocab.tokenize(text.encode(), add_bos=False, special=True) == expected, text
    finally:
        vocab.close()


def test_a_multimodal_checkpoint_is_read_as_its_language_model(tmp_path, gemma_dirs, llama_cpp_src):
    """Gemma3ForConditionalGeneration: its text config and language-model tensors, nothing of the
    vision tower; the GGUF written from it equals the converter's (text part) byte for byte."""
    from edgeprune.export.gguf_llama import write_gguf
    from edgeprune.models import load_reference, resolve_source

    ref = load_reference(resolve_source(str(gemma_dirs["multimodal"])), tmp_path / "cache")
    assert ref.config.model_type == "gemma3_text" and ref.config.layer_types == LAYER_TYPES
    source = ModuleStore(gemma_dirs["text_model"])
    assert sorted(ref.weights.names()) == sorted(source.names())
    for name in source.names():
        assert torch.equal(ref.weights.read(name), source.read(name)), name
    ours = tmp_path / "ours.gguf"
    write_gguf(ref.weights, Plan(), ref.tokenizer_spec, ours, "F32", Provenance("t", "0" * 64, {}), "t")
    theirs = tmp_path / "theirs.gguf"
    run_converter(llama_cpp_src, gemma_dirs["multimodal"], theirs)
    our_fields, our_tensors = gguf_contents(ours, GGUF_KEYS)
    their_fields, their_tensors = gguf_contents(theirs, GGUF_KEYS)
    assert {k: v for k, v in our_fields.items() if k in their_fields} == their_fields
    assert set(our_tensors) == set(their_tensors)
    for name, (shape, dtype, data) in their_tensors.items():
        assert our_tensors[name][:2] == (shape, dtype) and np.array_equal(our_tensors[name][2], data), name


def _prune(tmp_path, gemma_dirs, which: str, plan: str, cache_dir, *extra: str):
    from test_cli import edgeprune

    (tmp_path / "plan.toml").write_text(plan)
    out = tmp_path / "out"
    return edgeprune("prune", "--model", str(gemma_dirs[which]), "--plan", str(tmp_path / "plan.toml"), "-o",
                     str(out), "-p", "quick", "--calib", str(gemma_dirs["calib"]), "--cache-dir", str(cache_dir),
                     *extra), out


@pytest.mark.slow
def test_prune_of_a_multimodal_checkpoint_writes_its_pruned_language_model(tmp_path, gemma_dirs, cache_dir):
    """`edgeprune prune` on the 4B layout: a gemma3 GGUF with the kept layers' pattern, and a
    text-only transformers checkpoint computing what the plan computes."""
    from transformers import AutoModelForCausalLM

    proc, out = _prune(tmp_path, gemma_dirs, "multimodal", "drop_layers = [5]\n[all]\nheads = 2\nffn = 64\n",
                       cache_dir)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "plan.json").read_text())
    assert record["architecture"] == "gemma3"
    gguf_path = out / "model-multimodal-Q4_K_M.gguf"  # named after the model's directory
    assert _pattern(gguf_path) == [True] * 5
    assert read_gguf(gguf_path).get_field("gemma3.block_count").contents() == 5
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM" and hf.config.layer_types == LAYER_TYPES[:5]
    store = open_weights(ModelSource("hf_dir", str(gemma_dirs["multimodal"]), "gemma3"))
    expected = materialize(store, Plan.from_dict(record["plan"]))
    tokens = torch.from_numpy(TOKENS[:, :12] % 600)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, expected(tokens).logits)
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["mean_kld"] > 0


@pytest.mark.slow
def test_prune_refuses_a_per_layer_plan_for_gemma3_before_any_work(tmp_path, gemma_dirs, cache_dir):
    from test_cli import assert_clean_error

    proc, out = _prune(tmp_path, gemma_dirs, "text", "[layers.2]\nheads = 2\n", cache_dir)
    assert_clean_error(proc, "llama.cpp runs gemma3 models with one shape for every layer")
    assert not out.exists()


@pytest.mark.slow
def test_gemma3_builds_a_bundle_that_verifies(tmp_path, gemma_dirs, cache_dir):
    """A budget the unpruned model meets: the build, its bundle and verify on a Gemma 3 checkpoint."""
    from conftest import build_verified_bundle

    report, reader = build_verified_bundle(tmp_path / "bundle", gemma_dirs["text"], gemma_dirs["calib"], cache_dir)
    assert report["artifact"] == "model-text-Q4_K_M.gguf"
    assert reader.get_field("general.architecture").contents() == "gemma3"
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
