"""llama.cpp's runtime settings that the search may change, one value each wherever a model runs:
the benchmark worker (llama-cpp-python), llama-bench on a device, and the bundle's scripts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from edgeprune.runtimes.threads import thread_counts

FLASH_ATTN = ("off", "on")
UBATCHES = (512, 256)  # llama.cpp's default physical batch first: prompt tokens per compute call
# The KV cache's type for both K and V; a quantized one reads half the bytes per cached token at
# long contexts, and loses information (the one setting here that is not only rounding).
KV_CACHES = ("f16", "q8_0")
LOSSLESS_KV = "f16"
_GGML_TYPES = {"f16": 1, "q8_0": 8}  # ggml.h's enum ggml_type (a stable ABI), for llama_cpp.Llama
_BLOCK = {"f16": 1, "q8_0": 32}  # elements per block: a cached head's width must be a multiple
# Not searched: weights are read into memory, never memory-mapped (llama.cpp's load mode "none"),
# wherever a model is timed or deployed. With the mapping, llama.cpp repacks Q4_0/Q4_K/IQ4_NL into
# anonymous memory beside the mapped file, so peak RSS counts those weights twice (an 8B Q4_K_M:
# 7.79 GiB mapped, 4.72 GiB read); the RAM verdict must judge what the device needs.
LOAD_MODE = "none"


@dataclass(frozen=True)
class LlamaSettings:
    threads: int
    flash_attn: str = "off"
    ubatch: int = UBATCHES[0]
    kv_cache: str = KV_CACHES[0]

    @classmethod
    def of(cls, settings: Mapping[str, Any], threads: int) -> LlamaSettings:
        """From a settings mapping (`Workload.settings`, a bundle's manifest); unset ones take defaults."""
        unknown = set(settings) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"llama.cpp takes no setting {', '.join(sorted(unknown))}")
        out = cls(**({"threads": threads} | dict(settings)))
        if out.flash_attn not in FLASH_ATTN or out.kv_cache not in KV_CACHES or out.threads < 1 or out.ubatch < 1:
            raise ValueError(f"llama.cpp settings out of range: {out}")
        if out.kv_cache != LOSSLESS_KV and out.flash_attn != "on":
            raise ValueError(f"llama.cpp quantizes the V cache ({out.kv_cache}) only with flash attention on")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cli_args(self) -> list[str]:
        """The same settings for llama.cpp's programs (llama-bench, llama-completion, llama-server)."""
        return ["-t", str(self.threads), "-fa", self.flash_attn, "-ub", str(self.ubatch),
                "-ctk", self.kv_cache, "-ctv", self.kv_cache, "-lm", LOAD_MODE]

    def context_kwargs(self, n_batch: int) -> dict[str, Any]:
        """For llama_cpp.Llama: a decode call of up to `n_batch` tokens, computed `ubatch` at a time."""
        return {"n_threads": self.threads, "n_threads_batch": self.threads, "flash_attn": self.flash_attn == "on",
                "n_batch": n_batch, "n_ubatch": min(self.ubatch, n_batch),
                "type_k": _GGML_TYPES[self.kv_cache], "type_v": _GGML_TYPES[self.kv_cache],
                "use_mmap": LOAD_MODE != "none"}

    def kv_gap(self, key_dim: int, value_dim: int) -> str | None:
        """Why a model whose attention heads are `key_dim`/`value_dim` wide cannot cache them in this
        KV type (llama.cpp refuses to create the context), or None."""
        block = _BLOCK[self.kv_cache]
        if key_dim % block or value_dim % block:
            return (f"a {self.kv_cache} KV cache stores blocks of {block}, and this model's attention heads are "
                    f"{key_dim} wide (keys) and {value_dim} (values)")
        return None

    def lossy(self) -> dict[str, Any]:
        """Those settings that change the model's output beyond rounding: a quantized KV cache."""
        return {} if self.kv_cache == LOSSLESS_KV else {"kv_cache": self.kv_cache}


def space(cores: int) -> dict[str, tuple[Any, ...]]:
    """Each setting and the values to time, the default first."""
    return {"threads": thread_counts(cores), "flash_attn": FLASH_ATTN, "ubatch": UBATCHES, "kv_cache": KV_CACHES}
