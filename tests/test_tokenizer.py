import json

import pytest

from conftest import tiny_llama
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.models.tokenizer import PRE_TOKENIZERS, TokenizerSpec, pre_tokenizer_name

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Numbers: 3.14159, 1234567890, -42, 1e-5 and 2026-11-28T14:22:54Z.",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, emoji 🚀🔥👍🏽.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "    indented\ttabs\t\tand   multiple    spaces\n\n\nnewlines\r\nCRLF",
    "<html><body class=\"x\">&amp; {'json': [1, 2, null]}</body></html> // C++: std::vector<int> v{1,2};",
    "I'm sure you're right; they'll see it's what we'd've done. DON'T SHOUT.",
]


@pytest.fixture(scope="module")
def gguf_tokenizers(tmp_path_factory, embedded_reference, embedded_tokenizer_spec):
    """llama.cpp vocab-only models from our GGUF files: tokenizer copied from the source GGUF, and
    tokenizer rebuilt from the HF tokenizer."""
    import llama_cpp

    ref = embedded_reference
    out = {}
    for name, spec in (("from-gguf", embedded_tokenizer_spec),
                       ("from-hf", TokenizerSpec.from_hf(ref.tokenizer, ref.config.vocab_size))):
        path = tmp_path_factory.mktemp("tok") / f"{name}.gguf"
        export_gguf(tiny_llama(tied=True), spec, path, "F32", Provenance("t", "0" * 64, {}), "t")
        out[name] = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return out


@pytest.mark.parametrize("source", ["from-gguf", "from-hf"])
@pytest.mark.parametrize("text", TEXTS + ["CHAT"])
def test_gguf_tokenizes_exactly_like_hf(gguf_tokenizers, embedded_reference, source, text):
    tok = embedded_reference.tokenizer
    if text == "CHAT":
        text = tok.apply_chat_template(
            [{"role": "user", "content": "Résumé of 12 items?"}, {"role": "assistant", "content": "Sure: 1, 2, 3."}],
            tokenize=False,
        )
        assert "<|im_start|>" in text
    expected = tok(text, add_special_tokens=False)["input_ids"]
    got = gguf_tokenizers[source].tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert got == expected
    assert gguf_tokenizers[source].detokenize(got, special=True).decode("utf-8") == text


def test_specs_from_gguf_and_hf_agree(embedded_reference, embedded_tokenizer_spec):
    ref = embedded_reference
    assert TokenizerSpec.from_hf(ref.tokenizer, ref.config.vocab_size) == embedded_tokenizer_spec


@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_pre_tokenizer_is_named_by_structure(name):
    assert pre_tokenizer_name({"pre_tokenizer": json.loads(json.dumps(PRE_TOKENIZERS[name]))}) == name


def test_unknown_pre_tokenizer_is_a_clear_error():
    with pytest.raises(EdgepruneError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
