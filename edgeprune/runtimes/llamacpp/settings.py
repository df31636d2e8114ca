"""llama.cpp's runtime settings that the search may change, one value each wherever a model runs:
the benchmark worker (llama-cpp-python), llama-bench on a device, and the bundle's scripts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from edgeprune.runtimes.threads import thread_counts

FLASH_ATTN = ("off", "on")
UBATCHES = (512, 256)  # llama.cpp's default physical batch first: prompt tokens per compute call


@dataclass(frozen=True)
class LlamaSettings:
    threads: int
    flash_attn: str = "off"
    ubatch: int = UBATCHES[0]

    @classmethod
    def of(cls, settings: Mapping[str, Any], threads: int) -> LlamaSettings:
        """From a settings mapping (`Workload.settings`, a bundle's manifest); unset ones take defaults."""
        unknown = set(settings) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"llama.cpp takes no setting {', '.join(sorted(unknown))}")
        out = cls(**({"threads": threads} | dict(settings)))
        if out.flash_attn not in FLASH_ATTN or out.threads < 1 or out.ubatch < 1:
            raise ValueError(f"llama.cpp settings out of range: {out}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cli_args(self) -> list[str]:
        """The same settings for llama.cpp's programs (llama-bench, llama-completion, llama-server)."""
        return ["-t", str(self.threads), "-fa", self.flash_attn, "-ub", str(self.ubatch)]

    def context_kwargs(self, n_batch: int) -> dict[str, Any]:
        """For llama_cpp.Llama: a decode call of up to `n_batch` tokens, computed `ubatch` at a time."""
        return {"n_threads": self.threads, "n_threads_batch": self.threads, "flash_attn": self.flash_attn == "on",
                "n_batch": n_batch, "n_ubatch": min(self.ubatch, n_batch)}


def space(cores: int) -> dict[str, tuple[Any, ...]]:
    """Each setting and the values to time, the default first."""
    return {"threads": thread_counts(cores), "flash_attn": FLASH_ATTN, "ubatch": UBATCHES}
