"""Model families by name, `model_type` and GGUF architecture. Importing this loads every family."""

from __future__ import annotations

from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.families import gemma3 as _gemma3  # noqa: F401  (registers "gemma3")
from edgeprune.families import llama as _llama  # noqa: F401  (registers "llama")
from edgeprune.families import phi3 as _phi3  # noqa: F401  (registers "phi3")
from edgeprune.families import qwen2 as _qwen2  # noqa: F401  (registers "qwen2")
from edgeprune.families import qwen3 as _qwen3  # noqa: F401  (registers "qwen3")
from edgeprune.families.base import Family, interleaves_qk, known_model_types

__all__ = ["Family", "family_for", "family_of", "family_of_arch", "gguf_archs", "interleaves_qk", "known_model_types"]


def gguf_archs() -> tuple[str, ...]:
    """Every GGUF architecture edgeprune reads and writes."""
    return tuple(dict.fromkeys(a for cls in Family.registry.values() for a in cls().gguf_archs))


def family_for(model_type: str | None, where: str) -> Family:
    """The family that loads configs of `model_type`; `where` names the model in the refusal."""
    for cls in Family.registry.values():
        if model_type in cls.model_types:
            return cls()
    raise EdgepruneError(f"{where} is a '{model_type}' model; edgeprune supports {', '.join(known_model_types())} "
                         "so far.")


def family_of(config: Any) -> Family:
    """The family of a config edgeprune loaded (see `Family.normalize_config`)."""
    return family_for(getattr(config, "model_type", None), "The model")


def family_of_arch(arch: str | None, where: str) -> Family:
    """The family a GGUF of architecture `arch` whose layers share one shape belongs to."""
    for cls in Family.registry.values():
        if arch == cls().gguf_archs[0]:
            return cls()
    known = sorted(cls().gguf_archs[0] for cls in Family.registry.values())
    raise EdgepruneError(f"{where} is a '{arch}' model; edgeprune reads {', '.join(known)} GGUFs so far.")
