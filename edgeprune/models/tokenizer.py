"""The tokenizer as llama.cpp sees it, read from a GGUF or a Hugging Face tokenizer.

llama.cpp does not run the tokenizer.json pre-tokenizer; it picks a hard-coded regex set by the
`tokenizer.ggml.pre` name. We name it by matching the tokenizer.json pre-tokenizer's structure
against the regex sets llama.cpp implements (`PRE_TOKENIZERS`), and use the same table the other
way round to give a GGUF-sourced HF tokenizer the pre-tokenizer its GGUF runtime applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gguf

from edgeprune.errors import EdgepruneError

K = gguf.Keys.Tokenizer

_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _byte_level(use_regex: bool) -> dict[str, Any]:
    """ByteLevel with use_regex=True splits with the GPT-2 regex; False leaves splitting to a Split before it."""
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# llama.cpp pre-tokenizer name -> the tokenizers.json pre_tokenizer that splits text identically.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _byte_level(use_regex=True),
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)],
    },
    "llama-bpe": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": _LLAMA3_SPLIT},
                "behavior": "Isolated",
                "invert": False,
            },
            _byte_level(use_regex=False),
        ],
    },
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

    model: str  # "gpt2" (byte-level BPE)
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

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> TokenizerSpec:
        def get(key: str, default: Any = None) -> Any:
            field = reader.get_field(key)
            return default if field is None else field.contents()

        model = get(K.MODEL)
        if model != "gpt2":
            raise EdgepruneError(
                f"The GGUF's tokenizer model is '{model}'; edgeprune supports byte-level BPE ('gpt2') so far."
            )
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
            add_bos=bool(get(K.ADD_BOS, False)),
            add_eos=bool(get(K.ADD_EOS, False)),
            chat_template=get(K.CHAT_TEMPLATE),
        )

    @classmethod
    def from_hf(cls, tokenizer: Any, vocab_size: int) -> TokenizerSpec:
        data = json.loads(tokenizer.backend_tokenizer.to_str())
        bpe = data["model"]
        if bpe.get("type") != "BPE" or bpe.get("byte_fallback"):
            raise EdgepruneError(
                "The model's tokenizer is not byte-level BPE (e.g. a SentencePiece tokenizer); "
                "edgeprune cannot export it to GGUF yet."
            )
        id_to_token = {i: t for t, i in bpe["vocab"].items()}
        added = {a["id"]: a for a in data.get("added_tokens", [])}
        id_to_token.update({i: a["content"] for i, a in added.items()})
        if max(id_to_token) >= vocab_size:
            raise EdgepruneError(
                f"The tokenizer has token ids up to {max(id_to_token)} but the model's vocabulary is "
                f"{vocab_size}; the checkpoint's tokenizer does not belong to its weights."
            )
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
        probe = tokenizer("a")["input_ids"]
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        return cls(
            model="gpt2",
            pre=pre_tokenizer_name(data),
            tokens=tokens,
            token_types=[int(t) for t in types],
            merges=merges,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            unk_id=tokenizer.unk_token_id,
            pad_id=tokenizer.pad_token_id,
            add_bos=tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] != bare[:1],
            add_eos=tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id] != bare[-1:],
            chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        )

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for key, value in (
            (K.BOS_ID, self.bos_id),
            (K.EOS_ID, self.eos_id),
            (K.UNK_ID, self.unk_id),
            (K.PAD_ID, self.pad_id),
        ):
            if value is not None:
                writer.add_uint32(key, value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def set_pre_tokenizer(tokenizer: Any, pre: str) -> Any:
    """Give an HF tokenizer the pre-tokenizer llama.cpp applies for `pre` (if we know it)."""
    from tokenizers import Tokenizer

    if pre not in PRE_TOKENIZERS:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer
