"""Load the reference model: an fp32 torch `LlamaForCausalLM` plus its tokenizer.

A GGUF source is dequantized by transformers once (about 30 s for the embedded model) and cached
as a safetensors directory keyed by the GGUF's sha256, the conversion code and the tools' versions,
so later builds load it in a second or two (concurrent builds convert it once).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeprune.atomic import build_once, sweep
from edgeprune.errors import EdgepruneError
from edgeprune.gguf_file import read_gguf
from edgeprune.hashing import code_hash, sha256_json
from edgeprune.models.source import ModelSource
from edgeprune.models.tokenizer import TokenizerSpec, set_pre_tokenizer

log = logging.getLogger(__name__)

# Config types loaded as LlamaForCausalLM (same tensors and names; see `as_llama_config`).
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Buffers some older checkpoints carry; transformers recomputes them.
_IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class Reference:
    model: Any  # transformers.LlamaForCausalLM, fp32, eval mode
    tokenizer: Any  # transformers tokenizer whose splits match the GGUF runtime
    tokenizer_spec: TokenizerSpec
    source: ModelSource
    sha256: str

    @property
    def config(self) -> Any:
        return self.model.config


def _check_arch(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EdgepruneError(
            f"{where} is a '{model_type}' model; edgeprune supports {', '.join(SUPPORTED_MODEL_TYPES)} so far."
        )


def as_llama_config(config: Any, where: str) -> Any:
    """A LlamaConfig for a supported config: Mistral (v0.1-v0.3, Nemo-style explicit head_dim) is
    Llama's graph plus a sliding window, with the same tensor names."""
    from transformers import LlamaConfig

    _check_arch(getattr(config, "model_type", None), where)
    if config.model_type == "llama":
        return config
    fields = config.to_dict()
    window = fields.pop("sliding_window", None)
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    llama = LlamaConfig(**fields)
    llama.architectures = ["LlamaForCausalLM"]
    if window is not None and window < config.max_position_embeddings:
        log.warning(
            "%s uses a %d-token sliding attention window, but llama.cpp's llama architecture attends over "
            "the whole context: outputs agree with the original model only for contexts up to %d tokens.",
            where, window, window,
        )
    return llama


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers would load from `directory` (sharded or not)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise EdgepruneError(
                f"{directory} lists weight shards it does not contain ({', '.join(missing[:3])}); "
                "download the model's remaining .safetensors files."
            )
        return [directory / s for s in shards]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise EdgepruneError(
            f"{directory} has only pickled weights (.bin/.pt), which edgeprune never loads: "
            "convert them to safetensors first."
        )
    raise EdgepruneError(
        f"{directory} has no model weights (model.safetensors or model.safetensors.index.json); "
        "pass a directory that holds the model's safetensors files."
    )


def _checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers (no weights are read)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise EdgepruneError(f"Cannot read the weights file {path}: {e}".rstrip(".") + ".") from None
    return {k: v for k, v in shapes.items() if not _IGNORED_TENSORS.search(k)}


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied: absent from checkpoints (ignored if present)
    return shapes


def check_weights(directory: Path, config: Any) -> None:
    """Refuse weights that disagree with config.json, before transformers would silently
    random-initialise missing tensors or fail deep in load_state_dict."""
    found = _checkpoint_shapes(weight_files(directory))
    expected = _expected_shapes(config)
    layers = {int(m.group(1)) for name in found if (m := _LAYER_INDEX.match(name))}
    n_layers = max(layers) + 1 if layers else 0
    if n_layers != config.num_hidden_layers:
        raise EdgepruneError(
            f"{directory}: config.json declares {config.num_hidden_layers} layers but the weights have {n_layers}; "
            "the config does not belong to these weights."
        )
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected) - {"lm_head.weight"})
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        raise EdgepruneError(
            f"{directory}: the weights do not match a Llama model with this config.json ({what}); "
            "pass the directory the checkpoint was saved to, unmodified."
        )
    width = found["model.embed_tokens.weight"][-1]
    if width != config.hidden_size:
        raise EdgepruneError(
            f"{directory}: config.json declares hidden_size {config.hidden_size} but the weights are {width} wide; "
            "the config does not belong to these weights."
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise EdgepruneError(
                f"{directory}: config.json does not match the weights: {name} has shape {list(found[name])} where "
                f"the config (hidden_size {config.hidden_size}, intermediate_size {config.intermediate_size}, "
                f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, head_dim "
                f"{getattr(config, 'head_dim', None)}, vocab {config.vocab_size}) implies {list(shape)}."
            )


def _load_hf(directory: Path, trust_remote_code: bool) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EdgepruneError(f"Cannot read the model config of {directory}: {e}".rstrip(".") + ".") from None
    config = as_llama_config(config, str(directory))
    check_weights(directory, config)
    model, info = LlamaForCausalLM.from_pretrained(
        directory, config=config, dtype=torch.float32, use_safetensors=True, output_loading_info=True
    )
    # Belt and braces: transformers only warns when it random-initialises a tensor.
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise EdgepruneError(
            f"{directory}: transformers could not load every weight as config.json describes ({problems})."
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def _gguf_to_hf_dir(gguf_path: Path, target: Path) -> None:
    """Dequantize a llama GGUF into an fp32 safetensors HF directory at `target`."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    reader = read_gguf(gguf_path)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    _check_arch(arch_field.contents() if arch_field else None, str(gguf_path))
    spec = TokenizerSpec.from_gguf(reader)
    del reader

    log.info("dequantizing %s into a torch reference (once; cached)", gguf_path.name)
    directory, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = set_pre_tokenizer(AutoTokenizer.from_pretrained(directory, gguf_file=name), spec.pre)
    # The weights are plain fp32 now, but save_pretrained refuses a model loaded through the GGUF
    # quantizer: move them into a fresh model whose config has no quantization_config.
    config = model.config
    del config.quantization_config
    config.name_or_path = ""
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    model = plain

    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _converted(hf_dir: Path) -> bool:
    return (hf_dir / "config.json").is_file()


def converted_dir(cache_dir: Path, gguf_sha256: str) -> Path:
    """Where the torch reference of a GGUF is cached: keyed like a stage, by the GGUF, the conversion
    code and the tools that dequantize it."""
    tools = {dist: metadata.version(dist) for dist in ("torch", "transformers", "gguf")}
    key = sha256_json({"gguf": gguf_sha256, "code": code_hash(__name__), "tools": tools})
    return cache_dir / "reference" / f"{gguf_sha256[:20]}-{key[:12]}"


def load_reference(source: ModelSource, cache_dir: Path, trust_remote_code: bool = False) -> Reference:
    sha = source.sha256()
    if source.kind in ("embedded", "gguf"):
        hf_dir = converted_dir(cache_dir, sha)
        if not _converted(hf_dir):
            sweep(hf_dir.parent)
            build_once(hf_dir, _converted, lambda tmp: _gguf_to_hf_dir(source.path, tmp))
        model, tokenizer = _load_hf(hf_dir, trust_remote_code=False)
        spec = TokenizerSpec.from_gguf(read_gguf(source.path))
    else:
        model, tokenizer = _load_hf(source.local_dir(), trust_remote_code)
        spec = TokenizerSpec.from_hf(tokenizer, model.config.vocab_size, model.config)
    return Reference(model=model, tokenizer=tokenizer, tokenizer_spec=spec, source=source, sha256=sha)
