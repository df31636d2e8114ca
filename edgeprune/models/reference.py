"""The reference model: its weights where they are stored (a `WeightStore`), config and tokenizer.

Nothing is loaded whole: passes read the weights one decoder layer at a time (`models/streamed.py`).
A GGUF source is read in place (each tensor dequantized when read); its tokenizer, which
transformers builds from the GGUF's vocabulary in seconds, is cached as a directory.
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
from edgeprune.families import family_for, family_of, family_of_arch
from edgeprune.gguf_file import read_gguf
from edgeprune.hashing import code_hash, sha256_json
from edgeprune.models.source import ModelSource
from edgeprune.models.tokenizer import TokenizerSpec, set_pre_tokenizer
from edgeprune.models.weights import IGNORED, GGUFStore, SafetensorsStore, WeightStore

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class Reference:
    weights: WeightStore  # read one tensor at a time, in the stored dtype
    tokenizer: Any  # transformers tokenizer whose splits match the GGUF runtime
    tokenizer_spec: TokenizerSpec
    source: ModelSource
    sha256: str

    @property
    def config(self) -> Any:
        return self.weights.config

    @property
    def parameters(self) -> int:
        return self.weights.parameters


def family_config(config: Any, where: str) -> Any:
    """The config edgeprune works with (Mistral's becomes a LlamaConfig); an unsupported family is refused."""
    return family_for(getattr(config, "model_type", None), where).normalize_config(config, where)


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
        return _readable([directory / s for s in shards])
    if (directory / "model.safetensors").is_file():
        return _readable([directory / "model.safetensors"])
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise EdgepruneError(
            f"{directory} has only pickled weights (.bin/.pt), which edgeprune never loads: "
            "convert them to safetensors first."
        )
    raise EdgepruneError(
        f"{directory} has no model weights (model.safetensors or model.safetensors.index.json); "
        "pass a directory that holds the model's safetensors files."
    )


def _readable(files: list[Path]) -> list[Path]:
    """Open each file once: an unreadable one raises the OSError cli.main names in one sentence
    (safetensors would report a permission problem as a missing file)."""
    for path in files:
        with open(path, "rb"):
            pass
    return files


def check_weights(directory: Path, store: SafetensorsStore) -> None:
    """Refuse weights that disagree with config.json, before transformers would silently
    random-initialise missing tensors or fail deep in load_state_dict."""
    config = store.config
    found = {name: store.shape(name) for name in store.names()}
    expected = {k: v for k, v in family_of(config).tensor_shapes(config).items() if not IGNORED.search(k)}
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
            f"{directory}: the weights do not match a {family_of(config).name} model with this config.json ({what}); "
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


def _hf_store(directory: Path, trust_remote_code: bool) -> tuple[SafetensorsStore, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EdgepruneError(f"Cannot read the model config of {directory}: {e}".rstrip(".") + ".") from None
    config = family_config(config, str(directory))
    store = SafetensorsStore(weight_files(directory), config)
    check_weights(directory, store)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    return store, tokenizer


def gguf_config(reader: Any, where: str) -> Any:
    """The transformers config of a GGUF with one shape for all layers, from its metadata alone (no
    tensor is read; transformers' own parser decodes every token of the vocabulary to do this, ~20 s
    for the embedded model)."""
    import gguf

    from edgeprune.gguf_file import hparams, metadata

    family = family_of_arch(metadata(reader, gguf.Keys.General.ARCHITECTURE, None), where)
    hp = hparams(reader)
    if len(set(hp.heads)) != 1 or len(set(hp.kv_heads)) != 1 or len(set(hp.ffn)) != 1:
        raise EdgepruneError(f"{where} gives its layers different shapes; edgeprune reads GGUFs whose layers share "
                             "one shape.")
    arch = hp.arch
    rope: dict[str, Any] = {"rope_type": "default",
                            "rope_theta": float(metadata(reader, gguf.Keys.Rope.FREQ_BASE.format(arch=arch), 10000.0))}
    if metadata(reader, gguf.Keys.Rope.SCALING_TYPE.format(arch=arch), "none") == "linear":
        rope = rope | {"rope_type": "linear",
                       "factor": float(metadata(reader, gguf.Keys.Rope.SCALING_FACTOR.format(arch=arch)))}
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        log.warning("%s scales RoPE frequencies by a rope_freqs tensor (Llama 3.1 style), which is not read back: "
                    "the torch reference uses plain RoPE, as transformers does for this file.", where)
    tokens = gguf.Keys.Tokenizer
    fields = dict(
        vocab_size=hp.vocab, hidden_size=hp.hidden, intermediate_size=hp.ffn[0], num_hidden_layers=len(hp.heads),
        num_attention_heads=hp.heads[0], num_key_value_heads=hp.kv_heads[0], head_dim=hp.head_dim,
        max_position_embeddings=hp.context_length or 2048,
        rms_norm_eps=float(metadata(reader, gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch))),
        rope_parameters=rope,
        bos_token_id=metadata(reader, tokens.BOS_ID, None), eos_token_id=metadata(reader, tokens.EOS_ID, None),
        pad_token_id=metadata(reader, tokens.PAD_ID, None),
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
    )
    return family.config_from_gguf(reader, hp, fields, where)


def _gguf_tokenizer(gguf_path: Path, spec: TokenizerSpec, cache_dir: Path, sha: str) -> Any:
    """The GGUF's tokenizer as transformers builds it, cached as a directory (building it takes seconds)."""
    from transformers import AutoTokenizer

    tools = {dist: metadata.version(dist) for dist in ("transformers", "gguf")}
    key = sha256_json({"gguf": sha, "code": code_hash(__name__), "tools": tools})
    directory = cache_dir / "tokenizer" / f"{sha[:20]}-{key[:12]}"

    def convert(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        set_pre_tokenizer(tokenizer, spec.pre).save_pretrained(tmp)

    def done(d: Path) -> bool:
        return (d / "tokenizer_config.json").is_file()

    if not done(directory):
        sweep(directory.parent)
        build_once(directory, done, convert)
    return set_pre_tokenizer(AutoTokenizer.from_pretrained(directory), spec.pre)


def open_weights(source: ModelSource, trust_remote_code: bool = False) -> WeightStore:
    """The source's weights as a store, without the tokenizer (the memory preflight reads shapes from it)."""
    if source.kind in ("embedded", "gguf"):
        reader = read_gguf(source.path)
        return GGUFStore(source.path, gguf_config(reader, str(source.path)), reader)
    return _hf_store(source.local_dir(), trust_remote_code)[0]


def load_reference(source: ModelSource, cache_dir: Path, trust_remote_code: bool = False,
                   weights: WeightStore | None = None) -> Reference:
    """`weights`: the store `open_weights` already opened for this source (the preflight's)."""
    sha = source.sha256()
    if source.kind in ("embedded", "gguf"):
        weights = weights or open_weights(source)
        spec = TokenizerSpec.from_gguf(weights.reader)
        tokenizer = _gguf_tokenizer(source.path, spec, cache_dir, sha)
    else:
        weights, tokenizer = _hf_store(source.local_dir(), trust_remote_code)
        spec = TokenizerSpec.from_hf(tokenizer, weights.config.vocab_size, weights.config)
    return Reference(weights=weights, tokenizer=tokenizer, tokenizer_spec=spec, source=source, sha256=sha)
