"""Random-weight checkpoints of real shapes (Llama, Qwen2.5, Qwen3, Gemma 3), for measuring memory and time at scale.

`write_checkpoint("llama-3.1-8b", dir)` writes what the hub ships for that model -- config.json,
bf16 safetensors sharded the hub's way (5 GB shards) with model.safetensors.index.json -- but with
seeded random weights (normal, std 0.02; norms 1.0) and the embedded model's tokenizer, its
vocabulary padded with reserved tokens to the preset's size. Quality figures of such a model mean
nothing; its memory and time are those of the real one.

Safetensors files are written tensor by tensor, in chunks, from a header computed from the shapes:
nothing close to a shard (let alone the model) is ever in RAM.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from edgeprune.atomic import build_once
from edgeprune.errors import EdgepruneError

log = logging.getLogger(__name__)

SHARD_BYTES = 5 * 10**9  # the hub's default max_shard_size ("5GB")
CHUNK_ELEMENTS = 1 << 24  # 32 MiB of bf16 per write
RESERVED = "<|reserved_special_token_{}|>"  # Llama 3 names its 256 spare special tokens so
RESERVED_SPECIAL = 256
FILLER = "<|filler_{}|>"  # regular vocabulary entries no merge produces
CONFIG_FILE = "config.json"
SYNTHETIC_FILE = "synthetic.json"  # what wrote the checkpoint (transformers ignores it)
NOTE = "random weights: quality figures (KLD, perplexity, agreement) are meaningless; memory and time are real"


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    max_positions: int = 131072
    family: str = "llama"  # "qwen2": q/k/v biases; "qwen3": per-head q/k norms; "gemma3": those and four norms
    sliding_window: int | None = None  # Gemma 3: five sliding-window layers, then a global one

    @property
    def model_type(self) -> str:
        return "gemma3_text" if self.family == "gemma3" else self.family

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order the hub's checkpoints store them."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
            ]
            if self.family == "qwen2":
                out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                        (p + "self_attn.v_proj.bias", (kv,))]
            if self.family in ("qwen3", "gemma3"):
                out += [(p + "self_attn.q_norm.weight", (self.head_dim,)),
                        (p + "self_attn.k_norm.weight", (self.head_dim,))]
            out += [
                (p + "self_attn.o_proj.weight", (h, q)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
            if self.family == "gemma3":
                out += [(p + "pre_feedforward_layernorm.weight", (h,)), (p + "post_feedforward_layernorm.weight", (h,))]
            out += [
                (p + "mlp.gate_proj.weight", (self.ffn, h)),
                (p + "mlp.up_proj.weight", (self.ffn, h)),
                (p + "mlp.down_proj.weight", (h, self.ffn)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def parameters(self) -> int:
        return sum(prod(shape) for _, shape in self.tensors())

    def bf16_bytes(self) -> int:
        return 2 * self.parameters()

    def shards(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """Tensors grouped into files as transformers' save_pretrained groups them: in order, a new
        shard whenever the next tensor would take this one past SHARD_BYTES."""
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in self.tensors():
            nbytes = 2 * prod(shape)
            if shards[-1] and size + nbytes > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += nbytes
        return shards

    def config(self, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
        """config.json as the hub ships it, with the special token ids of the tokenizer written alongside."""
        if self.family == "gemma3":
            return self._gemma3_config(bos_id, eos_id)
        if self.family != "llama":
            return self._qwen_config(bos_id, eos_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.ffn,
            "max_position_embeddings": self.max_positions,
            "mlp_bias": False,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": self.rope_scaling,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab,
        }

    def _qwen_config(self, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
        config = {
            "architectures": [f"{self.family.capitalize()}ForCausalLM"],
            "model_type": self.family,
            "attention_dropout": 0.0,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.ffn,
            "max_position_embeddings": self.max_positions,
            "max_window_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": self.rope_theta,
            "sliding_window": None,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab,
        }
        if self.family == "qwen3":  # Qwen2 configs derive head_dim; Qwen3's state it (128 at every size)
            config |= {"attention_bias": False, "head_dim": self.head_dim}
        return config

    def _gemma3_config(self, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
        assert self.sliding_window is not None
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_logit_softcapping": None,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "final_logit_softcapping": None,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.ffn,
            "max_position_embeddings": self.max_positions,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "query_pre_attn_scalar": self.head_dim,
            "rms_norm_eps": 1e-06,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "sliding_window_pattern": 6,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab,
        }


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {"factor": factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}


# Shapes as published in each model's config.json on the hub.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("llama-3.2-1b", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192, vocab=128256,
           tied=True, rope_scaling=_llama3_rope(32.0)),
    Preset("llama-3.2-3b", hidden=3072, layers=28, heads=24, kv_heads=8, head_dim=128, ffn=8192, vocab=128256,
           tied=True, rope_scaling=_llama3_rope(32.0)),
    Preset("llama-3.1-8b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256,
           tied=False, rope_scaling=_llama3_rope(8.0)),
    Preset("qwen2.5-1.5b", hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, ffn=8960, vocab=151936,
           tied=True, rope_theta=1000000.0, max_positions=32768, family="qwen2"),
    Preset("qwen2.5-7b", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, ffn=18944, vocab=152064,
           tied=False, rope_theta=1000000.0, max_positions=32768, family="qwen2"),
    Preset("qwen3-1.7b", hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151936,
           tied=True, rope_theta=1000000.0, max_positions=40960, family="qwen3"),
    Preset("gemma3-1b", hidden=1152, layers=26, heads=4, kv_heads=1, head_dim=256, ffn=6912, vocab=262144,
           tied=True, rope_theta=1000000.0, max_positions=32768, family="gemma3", sliding_window=512),
    # For CI: 0.43B parameters (0.86 GB bf16), widths K-quant friendly, the embedded model's vocabulary.
    Preset("synthetic-0.5b", hidden=1536, layers=14, heads=24, kv_heads=8, head_dim=64, ffn=4096, vocab=49152,
           tied=True, rope_theta=100000.0, max_positions=8192),
)}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise EdgepruneError(f"Unknown synthetic model {name!r}; presets: {', '.join(PRESETS)}.")
    return PRESETS[name]


def tensor_seed(seed: int, name: str) -> int:
    """Each tensor's own generator seed: its values do not depend on the other tensors or the sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def tensor_chunks(name: str, shape: tuple[int, ...], seed: int, std: float = 0.02) -> Iterator[Any]:
    """The tensor's bf16 values (little-endian, row-major) as uint16 arrays of up to CHUNK_ELEMENTS:
    ones for norms, else normal(0, std) from the tensor's seeded generator."""
    import numpy as np
    import torch

    n = prod(shape)
    if len(shape) == 1 and not name.endswith("bias"):  # RMSNorm weights
        yield np.full(n, 0x3F80, dtype=np.uint16)  # bf16 1.0
        return
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    buffer = torch.empty(min(n, CHUNK_ELEMENTS), dtype=torch.float32)
    for start in range(0, n, CHUNK_ELEMENTS):
        chunk = buffer[: min(CHUNK_ELEMENTS, n - start)]
        chunk.normal_(0.0, std, generator=generator)
        # bf16 is the high half of an fp32 (truncated, not rounded: these are random numbers anyway),
        # the odd uint16 on a little-endian host; twice as fast as torch's .to(bfloat16) here.
        yield np.ascontiguousarray(chunk.numpy().view(np.uint16)[1::2])


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The safetensors header (length prefix included) of bf16 tensors stored back to back."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * prod(shape)
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int, std: float = 0.02) -> None:
    with open(path, "wb") as f:
        f.write(_header(tensors))
        for name, shape in tensors:
            for chunk in tensor_chunks(name, shape, seed, std):
                f.write(chunk)


@functools.cache
def _embedded_tokenizer() -> Any:
    """The embedded model's HF tokenizer, splitting text as llama.cpp does (parsing the GGUF takes ~25 s)."""
    from transformers import AutoTokenizer

    from edgeprune.gguf_file import read_gguf
    from edgeprune.models.embedded import embedded_gguf
    from edgeprune.models.tokenizer import TokenizerSpec, set_pre_tokenizer

    path = embedded_gguf()
    spec = TokenizerSpec.from_gguf(read_gguf(path))
    return set_pre_tokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), spec.pre)


def write_tokenizer(directory: Path, vocab: int) -> tuple[int | None, int | None]:
    """The embedded model's tokenizer resized to `vocab` tokens and saved into `directory`; its BOS and
    EOS ids.

    Padded the way Llama 3's vocabulary is made: regular BPE entries (unreachable by any merge, so
    text tokenizes as before), then RESERVED_SPECIAL special tokens. Padding with ~80k *added* tokens
    instead would make every tokenizer load take 20 s, which a real 128k vocabulary does not.
    """
    tokenizer = _embedded_tokenizer()
    size = len(tokenizer)
    if size > vocab:
        raise ValueError(f"the embedded tokenizer has {size} tokens, more than the vocabulary {vocab}")
    tokenizer.save_pretrained(directory)
    if size == vocab:
        return tokenizer.bos_token_id, tokenizer.eos_token_id
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    specials = min(RESERVED_SPECIAL, vocab - size)
    bpe_vocab = data["model"]["vocab"]
    for i in range(size, vocab - specials):
        bpe_vocab[FILLER.format(i)] = i
    for k, i in enumerate(range(vocab - specials, vocab)):
        data["added_tokens"].append({"id": i, "content": RESERVED.format(k), "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def _complete(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def write_checkpoint(name_or_preset: str | Preset, directory: Path, seed: int = 0, std: float = 0.02) -> Path:
    """Write the preset's checkpoint into `directory` (atomically: a killed writer leaves no half
    checkpoint) unless it is already there; returns `directory`."""
    p = preset(name_or_preset) if isinstance(name_or_preset, str) else name_or_preset
    directory = Path(directory)

    def fill(tmp: Path) -> None:
        bos, eos = write_tokenizer(tmp, p.vocab)
        shards = p.shards()
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for file, tensors in zip(files, shards, strict=True):
            log.info("writing %s (%d tensors)", file, len(tensors))
            write_safetensors(tmp / file, tensors, seed, std)
        if len(shards) > 1:
            weight_map = {name: file for file, tensors in zip(files, shards, strict=True) for name, _ in tensors}
            index = {"metadata": {"total_size": p.bf16_bytes()}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2))
        (tmp / SYNTHETIC_FILE).write_text(json.dumps({"preset": p.name, "parameters": p.parameters(), "seed": seed,
                                                      "std": std, "note": NOTE}, indent=2))
        (tmp / CONFIG_FILE).write_text(json.dumps(p.config(bos, eos), indent=2))

    if not _complete(directory):
        build_once(directory, _complete, fill)
    written = json.loads((directory / SYNTHETIC_FILE).read_text()) if (directory / SYNTHETIC_FILE).is_file() else {}
    if (written.get("preset"), written.get("seed"), written.get("std")) != (p.name, seed, std):
        raise EdgepruneError(f"{directory} already holds another checkpoint than the synthetic {p.name} (seed {seed}, "
                             f"std {std}); remove it or write elsewhere.")
    return directory


def seed_plan(layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """The case study's seed recipe as a plan spec (edgeprune/prune/spec.py): the middle 25% of layers
    removed, and one query head per KV group (the most important kept): Llama-3.1-8B's 32 -> 24, what
    the case study calls "20% of heads"; 24 -> 16 on Llama-3.2-3B's groups of three."""
    drop = int(layers * 0.25 + 0.5)
    first = (layers - drop) // 2
    spec: dict[str, Any] = {"drop_layers": list(range(first, first + drop))}
    if heads > kv_heads:
        spec["all"] = {"heads": heads - kv_heads}
    return spec
