"""What a model family changes in edgeprune: its transformers classes, its config, its llama.cpp
architecture and what that architecture can hold, and how its tensors are laid out in a GGUF.

Everything else (plans, slicing, the streamed passes, the search) works on HF tensor names and a
`ModelShape`, which every family shares. Families register by subclassing, under their `name`;
`edgeprune.families` finds the one a config, a `model_type` or a GGUF architecture belongs to.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, ClassVar

import gguf

from edgeprune.errors import EdgepruneError

# Enough blocks for any model llama.cpp loads (src/llama-hparams.h: LLAMA_MAX_LAYERS).
_NAME_MAP_BLOCKS = 512
# Architectures whose graph rotates adjacent pairs (RoPE "norm", llama_model_rope_type), where HF
# rotates halves: their Q and K rows (and biases) are permuted per head. Others rotate halves (NeoX).
NORM_ROPE = (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.DECI)


def interleaves_qk(arch: str) -> bool:
    """Whether a GGUF of architecture `arch` stores Q/K rows in llama.cpp's adjacent-pair order."""
    return arch in {gguf.MODEL_ARCH_NAMES[a] for a in NORM_ROPE}


@lru_cache(maxsize=None)
def _name_map(arch: gguf.MODEL_ARCH) -> gguf.TensorNameMap:
    return gguf.TensorNameMap(arch, _NAME_MAP_BLOCKS)


class Family:
    """One architecture family. Subclasses set the class attributes and override what differs."""

    registry: ClassVar[dict[str, type[Family]]] = {}

    name: ClassVar[str]  # how edgeprune names it: "llama"
    model_types: ClassVar[tuple[str, ...]]  # transformers `model_type`s it loads
    hf_module: ClassVar[str]  # transformers.models.<hf_module>.modeling_<hf_module>
    hf_prefix: ClassVar[str]  # class name prefix there: <prefix>ForCausalLM, <prefix>DecoderLayer
    arch: ClassVar[gguf.MODEL_ARCH]  # llama.cpp's architecture for a model whose layers share one shape
    # llama.cpp's architecture that reads per-layer head counts and FFN widths (and takes what `arch`
    # cannot hold), if one computes the family's layer: Llama's and Qwen2's run in `deci`.
    per_layer_arch: ClassVar[gguf.MODEL_ARCH | None] = None
    fused_projections: ClassVar[bool] = False  # q/k/v in one qkv_proj, gate/up in one gate_up_proj (Phi-3)
    head_pruning: ClassVar[bool] = True  # False: llama.cpp's graph needs every query head (see `holds`)
    rope_kinds: ClassVar[tuple[str, ...]] = ()  # RoPE scalings the family writes itself (`write_hparams`)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Family.registry[cls.name] = cls

    # -- transformers ------------------------------------------------------------------------------
    def _hf(self, suffix: str) -> Any:
        module = importlib.import_module(f"transformers.models.{self.hf_module}.modeling_{self.hf_module}")
        return getattr(module, self.hf_prefix + suffix)

    def causal_lm(self, config: Any) -> Any:
        """The family's transformers model for `config` (build it under `torch.device("meta")` for no storage)."""
        return self._hf("ForCausalLM")(config)

    def decoder_layer(self, config: Any, index: int) -> Any:
        return self._hf("DecoderLayer")(config, layer_idx=index)

    def rotary_embedding(self, config: Any) -> Any:
        return self._hf("RotaryEmbedding")(config=config)

    def tensor_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of `config` holds, by HF name (a tied model has no `lm_head.weight`)."""
        import torch

        with torch.device("meta"):
            model = self.causal_lm(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        return shapes

    def embedding_scale(self, config: Any) -> float:
        """What the model multiplies embedding rows by before layer 0 (Gemma: sqrt(hidden))."""
        return 1.0

    def real_buffers(self, model: Any) -> None:
        """Compute for real the non-persistent buffers a model built on the meta device lacks."""
        model.model.rotary_emb = self.rotary_embedding(model.config)

    def final_norm(self, config: Any) -> Any:
        """The module the family normalises the last hidden state with (weights to be loaded)."""
        return self._hf("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)

    def config_class(self) -> type:
        module = importlib.import_module(f"transformers.models.{self.hf_module}.configuration_{self.hf_module}")
        return getattr(module, self.hf_prefix + "Config")

    def normalize_config(self, config: Any, where: str) -> Any:
        """The config edgeprune works with, for a config of one of `model_types` (`where` names the source)."""
        return config

    def checkpoint_name(self, stored: str) -> str | None:
        """The name edgeprune gives a tensor stored under `stored` in an HF checkpoint (that of the
        family's ForCausalLM), or None for a tensor outside the language model (a vision tower)."""
        return stored

    # -- GGUF --------------------------------------------------------------------------------------
    def holds(self, n_head: int, shape: Any) -> bool:
        """Whether `arch` holds layers of `n_head` query heads (of the original `ModelShape`)."""
        return True

    def gguf_arch(self, layers: list[Any], shape: Any) -> gguf.MODEL_ARCH:
        """The architecture a model of these `LayerShape`s is written as: `arch` when they share one
        shape it holds, else `per_layer_arch`."""
        first = layers[0]
        if len(set(layers)) == 1 and first.has_attention and first.has_mlp and self.holds(first.n_head, shape):
            return self.arch
        if self.per_layer_arch is None:
            raise EdgepruneError(f"llama.cpp runs {self.name} models with one shape for every layer; "
                                 "prune every layer alike (or drop whole layers).")
        return self.per_layer_arch

    @property
    def gguf_archs(self) -> tuple[str, ...]:
        """The GGUF architecture names this family writes."""
        archs = (self.arch,) + ((self.per_layer_arch,) if self.per_layer_arch is not None else ())
        return tuple(gguf.MODEL_ARCH_NAMES[a] for a in archs)

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF name of an HF tensor name (gguf-py's table, shared with llama.cpp's converter)."""
        name = _name_map(self.arch).get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgepruneError(f"The model has a tensor edgeprune cannot place in a {self.name} GGUF: {hf_name}.")
        return name

    def norm_shift(self, hf_name: str) -> float:
        """What llama.cpp's converter adds to tensor `hf_name` (Gemma's norms store weight - 1)."""
        return 0.0

    def rope_dims(self, config: Any) -> int:
        """Dimensions of each head that RoPE rotates (`rope.dimension_count`)."""
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def write_hparams(self, writer: gguf.GGUFWriter, config: Any) -> dict[str, Any]:
        """Metadata the family's llama.cpp graph reads beyond the Llama set; extra tensors it needs
        (GGUF name -> float32 array)."""
        return {}

    def config_from_gguf(self, reader: Any, hp: Any, fields: dict[str, Any], where: str) -> Any:
        """The family's transformers config from a GGUF's metadata: `fields` are the keyword arguments
        every family shares (widths, norms, RoPE, special tokens)."""
        return self.config_class()(**fields, architectures=[self.hf_prefix + "ForCausalLM"])


def known_model_types() -> list[str]:
    return sorted(t for f in Family.registry.values() for t in f.model_types)
