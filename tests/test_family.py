"""Llama-family coverage: Llama 3.1 RoPE scaling, Mistral configs, SentencePiece tokenizers (Llama 2,
TinyLlama, Mistral v0.1), and clear errors for model directories we cannot load.

Oracles: llama.cpp's own convert_hf_to_gguf.py on the same HF directory (metadata, tensors and
the logits it reaches), the torch model (logits), and the sentencepiece model itself (tokens).
Parity tolerance as in test_export.py: top-1 equal everywhere, max difference no worse than the
converter's plus 1e-4 of the logits' spread.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import llama_cpp_logits, run_converter, torch_logits
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.export.rope import ROPE_FREQS, llama3_rope_factors, write_rope
from edgeprune.gguf_file import read_gguf
from edgeprune.models import load_reference, resolve_source
from edgeprune.models.source import ModelSource
from edgeprune.models.tokenizer import TokenizerSpec
from edgeprune.prune.modules import materialize

ADDED = ("<|im_start|>", "<|im_end|>")  # chat markers added after the SentencePiece model
PLAIN_TEXTS = [
    "Hello world! The pump reported a pressure of 42 bar at 13:05.",
    "Numbers: 3.14159, 1234567890, -42 and 2026-11-28.",
    "Ünïcödé: naïve café, Straße, Ελληνικά, 日本語, emoji 🚀👍🏽 (byte fallback).",
    "def f(n):\n\treturn n  *  2\n\n\nend",
]
# HF (transformers 5) tokenizes these differently from sentencepiece, llama.cpp follows sentencepiece.
SPM_ONLY_TEXTS = ["  two leading spaces", " one leading space"]


# --- models and tokenizers built in-process -------------------------------------------------------


def _corpus() -> list[str]:
    rng = random.Random(0)
    subjects = ["The pump", "A valve", "Our controller", "The sensor", "Every motor", "This model", "The operator"]
    verbs = ["reported", "measured", "logged", "predicted", "checked", "adjusted", "ignored"]
    things = ["a pressure of", "a temperature of", "a speed of", "an error rate of", "a latency of"]
    units = ["bar", "°C", "rpm", "%", "ms"]
    lines = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(things)} {rng.randint(0, 9999)} "
        f"{rng.choice(units)} at {i % 24}:{i % 60:02d}, within limits." for i in range(150)
    ]
    lines += ["def fibonacci(n: int) -> int:", "    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
              "Ünïcödé: naïve café, Straße, Ελληνικά, русский.", "I'm sure you're right; they'll see it."] * 5
    return lines


def _train_sentencepiece(directory: Path, vocab_size: int) -> Path:
    """A Llama 2 style SentencePiece model: BPE, byte fallback, split digits, identity normalization."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1,
    )
    return directory / "sp.model"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return _train_sentencepiece(tmp_path_factory.mktemp("spm"), 500)


def _sp(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def _hf_tokenizer(sp_path: Path):
    """The SentencePiece model as transformers' LlamaTokenizer (what transformers builds from a
    tokenizer.model: its vocabulary in id order, merges ordered by piece), plus two chat markers."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = _sp(sp_path)
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    merges = generate_merges(vocab, skip_tokens={"<unk>", "<s>", "</s>"})
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": list(ADDED)})
    return tok


def _init(model):
    """As conftest.tiny_llama: logits spread over several units so top-1 comparisons mean something."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def _config(cls, vocab: int, *, tied: bool = False, n_head: int = 4, n_head_kv: int = 2, head_dim: int = 16,
            **extra):
    return cls(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=n_head,
        num_key_value_heads=n_head_kv, head_dim=head_dim, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **extra,
    )


def _tiny(vocab: int, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _init(LlamaForCausalLM(_config(LlamaConfig, vocab, **kw)))


def _save_hf_dir(model, tokenizer, sp_path: Path, directory: Path, layout: str = "transformers4") -> Path:
    """An HF directory as users have them. "transformers4": like the Llama 2 / TinyLlama / Mistral
    repos (tokenizer.model, tokenizer_config.json with added_tokens_decoder). "transformers5":
    what transformers 5's save_pretrained writes (no added_tokens_decoder) plus tokenizer.model."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    shutil.copy(sp_path, directory / "tokenizer.model")
    if layout == "transformers4":
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": t.special}
            for i, t in tokenizer.added_tokens_decoder.items()
        }
        config_path.write_text(json.dumps(config, indent=2))
    return directory


def _spm_spec(sp_path: Path, directory: Path, vocab: int) -> TokenizerSpec:
    """Our GGUF tokenizer for the test SentencePiece model, read from a saved tokenizer directory."""
    from transformers import AutoTokenizer

    _hf_tokenizer(sp_path).save_pretrained(directory)
    shutil.copy(sp_path, directory / "tokenizer.model")
    return TokenizerSpec.from_hf(AutoTokenizer.from_pretrained(directory), vocab)


def _tokens(sp_path: Path, n: int = 40) -> np.ndarray:
    ids = [1] + _sp(sp_path).encode(" ".join(_corpus()[:6]))
    return np.array([ids[:n]])


def _export(model, spec: TokenizerSpec, path: Path) -> Path:
    export_gguf(model, spec, path, "F32", Provenance("tiny", "0" * 64, {}), "tiny")
    return path


def _assert_parity(expected: np.ndarray, ours: Path, theirs: Path, tokens: np.ndarray) -> tuple[float, float]:
    """Our GGUF's llama.cpp logits match torch at least as well as the converter's (see module doc)."""
    def compare(path: Path) -> tuple[float, float]:
        got = llama_cpp_logits(path, tokens)
        return float((expected.argmax(-1) == got.argmax(-1)).mean()), float(np.abs(expected - got).max())

    (top1, maxdiff), (ref_top1, ref_maxdiff) = compare(ours), compare(theirs)
    spread = float(expected.max() - expected.min())
    assert spread > 5.0, "test model too flat for top-1 to mean anything"
    assert top1 == 1.0 and top1 >= ref_top1
    assert maxdiff <= ref_maxdiff + 1e-4 * spread, (maxdiff, ref_maxdiff)
    return maxdiff, ref_maxdiff


def _reader_fields(path: Path, prefix: str) -> dict:
    reader = read_gguf(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


def _tensor(path: Path, name: str) -> np.ndarray:
    return next(np.array(t.data) for t in read_gguf(path).tensors if t.name == name)


# --- Llama 3.1 / 3.2 RoPE scaling --------------------------------------------------------------------

# Chosen so that, with head_dim 32 and theta 10000, the 16 frequencies fall in all three llama3
# bands (kept, smoothly blended, divided by `factor`) within the test's 40 positions.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _llama3(vocab: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    # head_dim 32 != hidden 64 / 4 heads: the factors must follow the explicit head_dim.
    config = _config(LlamaConfig, vocab, tied=tied, head_dim=32, rope_parameters=dict(LLAMA3_ROPE))
    return _init(LlamaForCausalLM(config))


@pytest.mark.parametrize("tied", [False, True], ids=["llama3.1-untied", "llama3.2-tied"])
def test_llama3_rope_scaling_matches_the_converter_and_torch(tmp_path, sp_model, llama_cpp_src, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = _sp(sp_model).vocab_size() + len(ADDED)
    model = _llama3(vocab, tied)
    factors = llama3_rope_factors(model.config)
    assert factors.shape == (16,) and factors.dtype == np.float32
    assert (factors == 1.0).any() and (factors == 8.0).any() and ((factors > 1.0) & (factors < 8.0)).any()

    tokens = _tokens(sp_model)
    expected = torch_logits(model, tokens)
    unscaled = LlamaForCausalLM(_config(LlamaConfig, vocab, tied=tied, head_dim=32)).eval()
    unscaled.load_state_dict(model.state_dict())
    spread = float(expected.max() - expected.min())
    assert np.abs(torch_logits(unscaled, tokens) - expected).max() > 0.01 * spread, "scaling has no effect here"

    hf_dir = _save_hf_dir(model, _hf_tokenizer(sp_model), sp_model, tmp_path / "hf")
    theirs = tmp_path / "converter.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs)
    ref = load_reference(resolve_source(str(hf_dir)), tmp_path / "cache")
    ours = _export(materialize(ref.weights), ref.tokenizer_spec, tmp_path / "ours.gguf")

    assert _tensor(ours, ROPE_FREQS).tobytes() == _tensor(theirs, ROPE_FREQS).tobytes()
    rope_keys = {k: v for k, v in _reader_fields(theirs, "llama.rope").items()}
    assert {k: v for k, v in _reader_fields(ours, "llama.rope").items() if k in rope_keys} == rope_keys
    maxdiff, ref_maxdiff = _assert_parity(expected, ours, theirs, tokens)
    print(f"llama3 rope: maxdiff ours {maxdiff:.3g}, converter {ref_maxdiff:.3g}, spread {spread:.3g}")


def test_pruned_llama3_exports_as_deci_with_its_rope_factors(tmp_path, sp_model):
    """Per-layer head counts make the file `deci`, whose graph applies rope_freqs too. No converter
    oracle for deci: the bound is test_export.py's 1e-4 of the logits' spread."""
    from edgeprune.prune import Plan, apply_plan

    vocab = _sp(sp_model).vocab_size() + len(ADDED)
    model = apply_plan(_llama3(vocab, tied=False), Plan(heads=((0, (0, 2)), (2, (2, 3)))))
    tokens = _tokens(sp_model)
    expected = torch_logits(model, tokens)
    path = _export(model, _spm_spec(sp_model, tmp_path / "tok", vocab), tmp_path / "deci.gguf")
    assert _reader_fields(path, "general.architecture")["general.architecture"] == "deci"
    np.testing.assert_array_equal(_tensor(path, ROPE_FREQS), llama3_rope_factors(model.config))
    got = llama_cpp_logits(path, tokens)
    spread = float(expected.max() - expected.min())
    assert spread > 5.0
    assert (got.argmax(-1) == expected.argmax(-1)).all() and np.abs(got - expected).max() <= 1e-4 * spread


def test_llama3_factors_for_a_llama31_8b_config():
    """Llama 3.1 8B's RoPE (theta 500000, head_dim 128): float32 factors within float32 rounding of
    the float64 formula, with all three bands present."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    got = llama3_rope_factors(config)
    freqs = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    wavelen = 2 * math.pi / freqs
    smooth = (8192 / wavelen - 1.0) / 3.0
    want = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    assert got.shape == (64,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] == 1.0 and got[-1] == 8.0 and ((got > 1) & (got < 8)).sum() > 0


class _Recorder:
    """A stand-in GGUFWriter that records the metadata calls write_rope makes."""
    def __init__(self):
        self.calls: dict[str, object] = {}

    def __getattr__(self, name):
        return lambda value: self.calls.__setitem__(name, value)


def test_linear_rope_scaling_is_written_as_metadata():
    from transformers import LlamaConfig

    config = _config(LlamaConfig, 100, rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0})
    writer = _Recorder()
    assert write_rope(writer, config) == {}
    assert writer.calls == {"add_rope_freq_base": 5e5, "add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
                            "add_rope_scaling_factor": 4.0}


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling_is_a_clear_error(kind):
    from types import SimpleNamespace

    config = SimpleNamespace(rope_parameters={"rope_type": kind, "rope_theta": 1e4, "factor": 4.0},
                             hidden_size=64, num_attention_heads=4, head_dim=16)
    with pytest.raises(EdgepruneError, match=f"RoPE scaling '{kind}'.*cannot export"):
        write_rope(_Recorder(), config)


# --- SentencePiece tokenizers, Llama 2 / TinyLlama style models ------------------------------------

SPM_MODELS = {
    "llama2": dict(tied=False, n_head=4, n_head_kv=4),  # MHA, untied
    "tinyllama": dict(tied=False, n_head=4, n_head_kv=1),  # GQA
}


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_sentencepiece_tokenizer_matches_the_converter_and_tokenizes_like_sentencepiece(
        tmp_path, sp_model, llama_cpp_src, layout):
    import llama_cpp

    sp = _sp(sp_model)
    n_pieces = sp.vocab_size()
    tokenizer = _hf_tokenizer(sp_model)
    hf_dir = _save_hf_dir(_tiny(n_pieces + len(ADDED)), tokenizer, sp_model, tmp_path / "hf", layout)
    ref = load_reference(resolve_source(str(hf_dir)), tmp_path / "cache")
    spec = ref.tokenizer_spec
    assert spec.model == "llama" and spec.scores is not None
    ours = _export(materialize(ref.weights), spec, tmp_path / "ours.gguf")
    theirs = tmp_path / "converter.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs)

    mine, converter = _reader_fields(ours, "tokenizer."), _reader_fields(theirs, "tokenizer.")
    # transformers 5 no longer lists added tokens in tokenizer_config.json, so the converter writes
    # [PADn] for those past the pieces and SentencePiece's types and scores for the others; we take
    # them from the HF tokenizer (what the converter writes from a transformers 4 directory).
    # Everything else is the converter's.
    lost = set(tokenizer.added_tokens_decoder) if layout == "transformers5" else set()
    for key, value in converter.items():
        if key == "tokenizer.ggml.add_sep_token":  # we leave llama.cpp's default (False) implicit
            assert value is False and key not in mine
            continue
        assert key in mine, f"we do not write {key}"
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            assert [v for i, v in enumerate(mine[key]) if i not in lost] == \
                   [v for i, v in enumerate(value) if i not in lost], key
        else:
            assert mine[key] == value, key
    assert mine["tokenizer.ggml.model"] == "llama" and mine["tokenizer.ggml.add_bos_token"] is True
    assert mine["tokenizer.ggml.tokens"][n_pieces:] == list(ADDED)
    types = mine["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.CONTROL
    assert types[1] == types[2] == gguf.TokenType.CONTROL and types[3] == gguf.TokenType.BYTE
    assert types[n_pieces] == gguf.TokenType.CONTROL and gguf.TokenType.NORMAL in types
    assert TokenizerSpec.from_gguf(read_gguf(ours)) == spec

    vocab_only = llama_cpp.Llama(str(ours), vocab_only=True, verbose=False)

    def llama_cpp_tokens(text: str) -> list[int]:
        return vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    for text in PLAIN_TEXTS:
        assert llama_cpp_tokens(text) == ref.tokenizer(text, add_special_tokens=False)["input_ids"], text
        assert llama_cpp_tokens(text) == sp.encode(text), text
    for text in SPM_ONLY_TEXTS:
        assert llama_cpp_tokens(text) == sp.encode(text), text
    # Added special tokens are single tokens; the text after them gets SentencePiece's "▁" prefix.
    chat = f"{ADDED[0]}user\nHi there{ADDED[1]}"
    assert llama_cpp_tokens(chat) == [n_pieces, *sp.encode("user\nHi there"), n_pieces + 1]
    assert vocab_only.tokenize(b"Hi", add_bos=True, special=False)[0] == 1


@pytest.mark.parametrize("name", list(SPM_MODELS))
def test_sentencepiece_models_export_and_match_torch(tmp_path, sp_model, llama_cpp_src, name):
    model = _tiny(_sp(sp_model).vocab_size() + len(ADDED), **SPM_MODELS[name])
    hf_dir = _save_hf_dir(model, _hf_tokenizer(sp_model), sp_model, tmp_path / "hf")
    ref = load_reference(resolve_source(str(hf_dir)), tmp_path / "cache")
    tokens = _tokens(sp_model)
    expected = torch_logits(model, tokens)
    theirs = tmp_path / "converter.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs)
    ours = _export(materialize(ref.weights), ref.tokenizer_spec, tmp_path / "ours.gguf")
    maxdiff, ref_maxdiff = _assert_parity(expected, ours, theirs, tokens)
    print(f"{name}: maxdiff ours {maxdiff:.3g}, converter {ref_maxdiff:.3g}")


def test_sentencepiece_tokenizer_without_its_model_file_is_a_clear_error(tmp_path, sp_model):
    from transformers import AutoTokenizer

    directory = tmp_path / "tok"
    _hf_tokenizer(sp_model).save_pretrained(directory)  # transformers 5 drops tokenizer.model
    with pytest.raises(EdgepruneError, match="no tokenizer.model"):
        TokenizerSpec.from_hf(AutoTokenizer.from_pretrained(directory), 600)


def test_sentencepiece_model_of_another_tokenizer_is_a_clear_error(tmp_path, sp_model):
    from transformers import AutoTokenizer

    directory = tmp_path / "tok"
    _hf_tokenizer(sp_model).save_pretrained(directory)
    shutil.copy(_train_sentencepiece(tmp_path / "other", 400), directory / "tokenizer.model")
    with pytest.raises(EdgepruneError, match="does not belong to the model's tokenizer.json"):
        TokenizerSpec.from_hf(AutoTokenizer.from_pretrained(directory), 600)


# --- Mistral configs -----------------------------------------------------------------------------


def test_mistral_config_loads_as_llama_and_matches_torch(tmp_path, sp_model, llama_cpp_src, caplog):
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    vocab = _sp(sp_model).vocab_size() + len(ADDED)
    mistral = _init(MistralForCausalLM(_config(MistralConfig, vocab, n_head=4, n_head_kv=1, sliding_window=128)))
    hf_dir = _save_hf_dir(mistral, _hf_tokenizer(sp_model), sp_model, tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "mistral"

    with caplog.at_level(logging.WARNING, logger="edgeprune.models.reference"):
        ref = load_reference(resolve_source(str(hf_dir)), tmp_path / "cache")
    assert isinstance(materialize(ref.weights), LlamaForCausalLM)
    assert any("128-token sliding attention window" in r.getMessage() and "whole context" in r.getMessage()
               for r in caplog.records)

    tokens = _tokens(sp_model)  # shorter than the window: Mistral and Llama attention agree
    expected = torch_logits(mistral, tokens)
    np.testing.assert_allclose(torch_logits(materialize(ref.weights), tokens), expected, rtol=0, atol=1e-5)
    theirs = tmp_path / "converter.gguf"
    run_converter(llama_cpp_src, hf_dir, theirs)
    ours = _export(materialize(ref.weights), ref.tokenizer_spec, tmp_path / "ours.gguf")
    maxdiff, ref_maxdiff = _assert_parity(expected, ours, theirs, tokens)
    print(f"mistral: maxdiff ours {maxdiff:.3g}, converter {ref_maxdiff:.3g}")


def test_mistral_without_a_short_window_loads_without_warning(tmp_path, sp_model, caplog):
    from transformers import MistralConfig, MistralForCausalLM

    vocab = _sp(sp_model).vocab_size() + len(ADDED)
    mistral = _init(MistralForCausalLM(_config(MistralConfig, vocab, sliding_window=None)))
    hf_dir = _save_hf_dir(mistral, _hf_tokenizer(sp_model), sp_model, tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="edgeprune.models.reference"):
        load_reference(resolve_source(str(hf_dir)), tmp_path / "cache")
    assert not [r for r in caplog.records if "sliding" in r.getMessage()]


# --- model directories we refuse -----------------------------------------------------------------


@pytest.fixture
def good_dir(tmp_path, sp_model) -> Path:
    model = _tiny(_sp(sp_model).vocab_size() + len(ADDED))
    return _save_hf_dir(model, _hf_tokenizer(sp_model), sp_model, tmp_path / "model")


def _load(directory: Path):
    return load_reference(ModelSource("hf_dir", str(directory), directory.name), directory.parent / "cache")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("model_type", ["gpt2", "falcon"])
def test_unsupported_architecture_is_named(good_dir, model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    (good_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgepruneError,
                       match=f"is a '{model_type}' model; edgeprune supports gemma3, gemma3_text, llama, mistral"):
        _load(good_dir)


def test_directory_without_weights_is_refused(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(EdgepruneError, match="no model weights"):
        resolve_source(str(good_dir))
    with pytest.raises(EdgepruneError, match=f"{good_dir} has no model weights"):
        _load(good_dir)
    (good_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(EdgepruneError, match="pickled"):
        _load(good_dir)


def test_fewer_layers_than_the_config_declares_is_refused(good_dir):
    _edit_config(good_dir, num_hidden_layers=4)  # the weights have 3
    with pytest.raises(EdgepruneError, match=f"{good_dir}: config.json declares 4 layers but the weights have 3"):
        _load(good_dir)


def test_more_layers_than_the_config_declares_is_refused(good_dir):
    _edit_config(good_dir, num_hidden_layers=2)
    with pytest.raises(EdgepruneError, match="declares 2 layers but the weights have 3"):
        _load(good_dir)


def test_hidden_size_disagreeing_with_the_weights_is_refused(good_dir):
    _edit_config(good_dir, hidden_size=128)  # weights are 64 wide
    with pytest.raises(EdgepruneError, match="declares hidden_size 128 but the weights are 64 wide"):
        _load(good_dir)


def test_head_count_disagreeing_with_the_weights_is_refused(good_dir):
    _edit_config(good_dir, num_key_value_heads=4)  # weights have 2 KV heads of 16
    with pytest.raises(EdgepruneError, match=r"does not match the weights: .*k_proj.weight has shape \[32, 64\]"):
        _load(good_dir)


def test_a_missing_tensor_is_refused_not_random_initialised(good_dir):
    from safetensors.torch import load_file, save_file

    path = good_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["lm_head.weight"]  # untied model without its output layer
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(EdgepruneError, match="missing lm_head.weight"):
        _load(good_dir)
