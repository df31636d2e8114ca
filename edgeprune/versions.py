"""The versions of the tools an artifact depends on: in cache keys and in manifests."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

from edgeprune import __version__
from edgeprune.runtimes import llamacpp


def tool_versions() -> dict[str, str]:
    return dict(_tool_versions())


@functools.cache
def _tool_versions() -> dict[str, str]:
    versions = {"edgeprune": __version__, "python": platform.python_version(), "llama.cpp": llamacpp.version()}
    for dist in ("torch", "transformers", "gguf", "llama-cpp-python"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
