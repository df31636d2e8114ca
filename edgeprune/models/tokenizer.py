"""The tokenizer as llama.cpp sees it, read from a GGUF or a Hugging Face tokenizer.

Two kinds: byte-level BPE (`gpt2`: Llama 3, SmolLM) and SentencePiece (`llama`: Llama 2,
TinyLlama, Mistral v0.1). For SentencePiece, pieces, scores and types come from tokenizer.model
and added tokens from the HF files, as llama.cpp's convert_hf_to_gguf.py reads them.

llama.cpp does not run the tokenizer.json pre-tokenizer; it picks a hard-coded regex set by the
`tokenizer.ggml.pre` name. We name it by matching the tokenizer.json pre-tokenizer's structure
against the regex sets llama.cpp implements (`PRE_TOKENIZERS`), and use the same table the other
way round to give a GGUF-sourced HF tokenizer the pre-tokenizer its GGUF runtime applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from edgeprune.errors import EdgepruneError

K = gguf.Keys.Tokenizer

_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# Qwen2 / Qwen2.5 / Qwen3: Llama 3's split with single digits.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
# Phi-4-mini (OpenAI's o200k split): case-aware words, contractions attached.
_CASED = "[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]"
_LOWER = "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]"
_CONTRACTION = "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (
    f"[^\\r\\n\\p{{L}}\\p{{N}}]?{_CASED}*{_LOWER}+{_CONTRACTION}|[^\\r\\n\\p{{L}}\\p{{N}}]?{_CASED}+{_LOWER}*{_CONTRACTION}"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _byte_level(use_regex: bool) -> dict[str, Any]:
    """ByteLevel with use_regex=True splits with the GPT-2 regex; False leaves splitting to a Split before it."""
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(regex: str) -> dict[str, Any]:
    """A regex split, then bytes mapped to characters (Llama 3, Qwen2, Phi-4-mini)."""
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            _byte_level(use_regex=False),
        ],
    }


# llama.cpp pre-tokenizer name -> the tokenizers.json pre_tokenizer that splits text identically.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _byte_level(use_regex=True),
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)],
    },
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
    "gpt-4o": _split_then_bytes(_GPT4O_SPLIT),
}


def _signature(pre: dict[str, Any] | None) -> list[tuple]:
    """The parts of a pre-tokenizer that change how text is split (not offsets bookkeeping)."""
    if pre is None:
        return []
    parts = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    return [
        (
            p.get("type"),
            json.dumps(p.get("pattern"), sort_keys=True),
            p.get("individual_digits"),
            p.get("use_regex"),
            p.get("add_prefix_space"),
            p.get("behavior"),
        )
        for p in parts
    ]


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    for name, pre in PRE_TOKENIZERS.items():
        if _signature(pre) == sig:
            return name
    raise EdgepruneError(
        "The model's tokenizer uses a pre-tokenizer llama.cpp support in edgeprune does not know "
        f"({json.dumps(tokenizer_json.get('pre_tokenizer'))[:120]}); known: {', '.join(PRE_TOKENIZERS)}."
    )


@dataclass
class TokenizerSpec:
    """Every tokenizer field a llama.cpp GGUF carries."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    scores: list[float] | None = None  # SentencePiece only: llama.cpp merges pieces by score
    add_space_prefix: bool | None = None  # "▁" before the text (SentencePiece); None: not written
    mask_id: int | None = None  # Gemma's tokenizers name one

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> TokenizerSpec:
        def get(key: str, default: Any = None) -> Any:
            field = reader.get_field(key)
            return default if field is None else field.contents()

        model = get(K.MODEL)
        if model not in ("gpt2", "llama"):
            raise EdgepruneError(
                f"The GGUF's tokenizer model is '{model}'; edgeprune supports byte-level BPE ('gpt2') and "
                "SentencePiece ('llama') tokenizers."
            )
        scores = get(K.SCORES)
        return cls(
            model=model,
            pre=get(K.PRE, "default"),
            tokens=list(get(K.LIST)),
            token_types=[int(t) for t in get(K.TOKEN_TYPE)],
            merges=list(get(K.MERGES, [])),
            bos_id=get(K.BOS_ID),
            eos_id=get(K.EOS_ID),
            unk_id=get(K.UNK_ID),
            pad_id=get(K.PAD_ID),
            mask_id=get(K.MASK_ID),
            add_bos=bool(get(K.ADD_BOS, False)),
            add_eos=bool(get(K.ADD_EOS, False)),
            chat_template=get(K.CHAT_TEMPLATE),
            scores=None if scores is None else [float(s) for s in scores],
            # Absent means llama.cpp's default: a "▁" prefix for SentencePiece only.
            add_space_prefix=bool(get(K.ADD_PREFIX, model == "llama")),
        )

    @classmethod
    def from_hf(cls, tokenizer: Any, vocab_size: int, model_config: Any = None) -> TokenizerSpec:
        """The GGUF tokenizer of an HF tokenizer, as llama.cpp's convert_hf_to_gguf.py writes it.

        `model_config` supplies special token ids the tokenizer lacks (the converter reads them
        from config.json too)."""
        data = json.loads(tokenizer.backend_tokenizer.to_str())
        if _is_sentencepiece_style(data):
            return _spm_spec(tokenizer, vocab_size, model_config)
        bpe = data["model"]
        if bpe.get("type") != "BPE":
            raise EdgepruneError(
                f"The model's tokenizer is a {bpe.get('type')} tokenizer; edgeprune exports byte-level BPE "
                "and SentencePiece (Llama 2 style) tokenizers to GGUF."
            )
        id_to_token = {i: t for t, i in bpe["vocab"].items()}
        added = {a["id"]: a for a in data.get("added_tokens", [])}
        id_to_token.update({i: a["content"] for i, a in added.items()})
        _check_fits(max(id_to_token), vocab_size)
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in id_to_token:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(id_to_token[i])
                types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(id_to_token[i])
                types.append(gguf.TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
        return cls(
            model="gpt2",
            pre=pre_tokenizer_name(data),
            tokens=tokens,
            token_types=[int(t) for t in types],
            merges=merges,
            add_space_prefix=False,
            **_special_tokens(tokenizer, vocab_size, model_config),
        )

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for key, value in (
            (K.BOS_ID, self.bos_id),
            (K.EOS_ID, self.eos_id),
            (K.UNK_ID, self.unk_id),
            (K.PAD_ID, self.pad_id),
            (K.MASK_ID, self.mask_id),
        ):
            if value is not None:
                writer.add_uint32(key, value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _check_fits(max_id: int, vocab_size: int) -> None:
    if max_id >= vocab_size:
        raise EdgepruneError(
            f"The tokenizer has token ids up to {max_id} but the model's vocabulary is "
            f"{vocab_size}; the checkpoint's tokenizer does not belong to its weights."
        )


def _special_tokens(tokenizer: Any, vocab_size: int, model_config: Any) -> dict[str, Any]:
    """Special ids (the tokenizer's, else config.json's, as the converter does) and whether
    encoding adds BOS/EOS (probed, so it is what the HF tokenizer really does)."""
    ids = {}
    for kind in ("bos", "eos", "unk", "pad", "mask"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is None:
            token_id = getattr(model_config, f"{kind}_token_id", None)
        ids[f"{kind}_id"] = token_id if isinstance(token_id, int) and 0 <= token_id < vocab_size else None
    probe = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        **ids,
        "add_bos": bos is not None and probe[:1] == [bos] != bare[:1],
        "add_eos": eos is not None and probe[-1:] == [eos] != bare[-1:],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


# --- SentencePiece (Llama 2, TinyLlama, Mistral v0.1) ---------------------------------------------

SPIECE_UNDERLINE = "\u2581"
# Scores llama.cpp's converter gives to added tokens and to ids the tokenizer does not define.
ADDED_SCORE, PAD_SCORE = -1000.0, -10000.0


def _is_sentencepiece_style(tokenizer_json: dict[str, Any]) -> bool:
    """HF converts SentencePiece BPE models to a BPE with byte fallback (byte-level BPE has none)."""
    model = tokenizer_json.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _sentencepiece_file(tokenizer: Any) -> Path:
    candidates = [getattr(tokenizer, "vocab_file", None), tokenizer.init_kwargs.get("vocab_file")]
    name = getattr(tokenizer, "name_or_path", None)
    if name:
        candidates.append(Path(name) / "tokenizer.model")
    for candidate in candidates:
        if candidate and str(candidate).endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    raise EdgepruneError(
        f"The tokenizer of {name or 'the model'} is SentencePiece-style but its directory has no tokenizer.model "
        "(transformers 5's save_pretrained drops it): copy the original model's tokenizer.model next to tokenizer.json."
    )


def _load_sentencepiece(path: Path) -> Any:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise EdgepruneError(
            "Exporting a SentencePiece tokenizer needs the `sentencepiece` package: pip install sentencepiece."
        ) from None
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise EdgepruneError(f"Cannot read the SentencePiece model {path}: {e}".rstrip(".") + ".") from None
    return processor


def _piece_type(sp: Any, i: int) -> int:
    """llama.cpp's converter asks these in this order; user-defined pieces count as normal here
    and become USER_DEFINED through the added-token lists."""
    for test, kind in ((sp.IsUnknown, gguf.TokenType.UNKNOWN), (sp.IsControl, gguf.TokenType.CONTROL),
                       (sp.IsUnused, gguf.TokenType.UNUSED), (sp.IsByte, gguf.TokenType.BYTE)):
        if test(i):
            return int(kind)
    return int(gguf.TokenType.NORMAL)


def _looks_special(text: str) -> bool:
    """Added tokens the converter makes CONTROL even when not flagged special (mirrors its list)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _added_entry(content: str, special: bool) -> tuple[str, int]:
    if special or _looks_special(content):
        return content, int(gguf.TokenType.CONTROL)
    # llama.cpp matches user-defined tokens against raw text, where spaces are still spaces.
    return content.replace(SPIECE_UNDERLINE, " "), int(gguf.TokenType.USER_DEFINED)


def _file_added_tokens(directory: Path) -> dict[int, tuple[str, int]]:
    """Added tokens as the converter reads them: added_tokens.json, then tokenizer_config.json."""
    out: dict[int, tuple[str, int]] = {}
    legacy = directory / "added_tokens.json"
    if legacy.is_file():
        for content, i in json.loads(legacy.read_text(encoding="utf-8")).items():
            out[int(i)] = (content, int(gguf.TokenType.USER_DEFINED))
    config = directory / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for i, token in decoder.items():
            out[int(i)] = _added_entry(token["content"], bool(token.get("special")))
    return out


def _spm_spec(tokenizer: Any, vocab_size: int, model_config: Any) -> TokenizerSpec:
    path = _sentencepiece_file(tokenizer)
    sp = _load_sentencepiece(path)
    n_pieces = sp.vocab_size()
    _check_fits(max([n_pieces - 1, *tokenizer.added_tokens_decoder]), vocab_size)
    _check_same_pieces(sp, tokenizer, path)

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(n_pieces):
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), float(sp.GetScore(i)), _piece_type(sp, i)
    added = _file_added_tokens(path.parent)
    # Added tokens the files above do not list (transformers 5 no longer writes added_tokens_decoder):
    # the converter would leave those past the SentencePiece model as [PADn] and those inside it (Gemma's
    # turn markers) as normal pieces llama.cpp never matches whole; take them from the HF tokenizer.
    for i, token in tokenizer.added_tokens_decoder.items():
        if i not in added:
            added[i] = _added_entry(token.content, token.special)
    for i, (text, kind) in added.items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text, ADDED_SCORE, kind
    return TokenizerSpec(
        model="llama",
        pre="default",
        tokens=tokens,
        token_types=types,
        merges=[],
        scores=scores,
        add_space_prefix=_adds_space_prefix(tokenizer),
        **_special_tokens(tokenizer, vocab_size, model_config),
    )


def _check_same_pieces(sp: Any, tokenizer: Any, path: Path) -> None:
    """tokenizer.model gives the scores llama.cpp merges by; it must be the model tokenizer.json came from."""
    hf_pieces = tokenizer.convert_ids_to_tokens(list(range(sp.vocab_size())))
    for i, hf_piece in enumerate(hf_pieces):
        if hf_piece != sp.IdToPiece(i):
            raise EdgepruneError(
                f"{path} does not belong to the model's tokenizer.json (token {i} is {sp.IdToPiece(i)!r} in one "
                f"and {hf_piece!r} in the other); use the tokenizer.model the model was trained with."
            )


def _adds_space_prefix(tokenizer: Any) -> bool:
    """Whether the HF tokenizer puts "▁" before the text (Llama 2 does; some fine-tunes turn it off)."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"][:1])
    return bool(first) and (first[0].startswith(SPIECE_UNDERLINE) or first[0] == "<0xE2>")


def set_pre_tokenizer(tokenizer: Any, pre: str) -> Any:
    """Give an HF tokenizer the pre-tokenizer llama.cpp applies for `pre` (if we know it)."""
    from tokenizers import Tokenizer

    if pre not in PRE_TOKENIZERS:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer
