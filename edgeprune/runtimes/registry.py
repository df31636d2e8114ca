"""The runtimes edgeprune can run models with, by name. Importing this loads every one of them:
stages import only their own runtime's modules, so adding a runtime rebuilds no artifact."""

from __future__ import annotations

from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.runtimes.base import Runtime
from edgeprune.runtimes.llamacpp import runtime as _llamacpp  # noqa: F401  (registers "llama.cpp")
from edgeprune.runtimes.onnx import runtime as _onnx  # noqa: F401  (registers "onnxruntime")

DEFAULT = "llama.cpp"


def runtime_for(model: Path) -> Runtime:
    """The runtime that runs a model file of this kind (by its suffix)."""
    for runtime in Runtime.registry.values():
        if runtime.format.suffix == model.suffix:
            return runtime()
    kinds = ", ".join(sorted(f"{r.format.suffix} ({r.name})" for r in Runtime.registry.values()))
    raise EdgepruneError(f"{model} is not a model file edgeprune can run: it runs {kinds} files.")


def get_runtime(name: str = DEFAULT) -> Runtime:
    if name not in Runtime.registry:
        raise EdgepruneError(f"Unknown runtime '{name}': edgeprune runs models with "
                             f"{', '.join(sorted(Runtime.registry))}.")
    return Runtime.registry[name]()
