"""The llama.cpp source tree the binaries are built from, and a version key for it.

It is the tree vendored in the llama-cpp-python sdist (unpacked by `make install` into
.deps/llama.cpp), so the device runs the same llama.cpp as the host's Python runtime. The sdist
carries no git metadata, hence the content hash as the version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_tree

# What the build reads; docs, tests and the Python converter do not change the binaries.
_BUILD_INPUTS = ("CMakeLists.txt", "cmake/**/*", "ggml/**/*", "src/**/*", "include/**/*", "common/**/*",
                 "tools/**/*", "vendor/**/*")


@dataclass(frozen=True)
class LlamaSource:
    path: Path
    digest: str  # content hash of the build inputs
    llama_cpp_python: str  # the package version whose sdist it came from (as installed here)

    @property
    def version(self) -> str:
        return f"llama-cpp-python {self.llama_cpp_python} sdist (source sha256 {self.digest[:12]})"


def source_dir() -> Path:
    env = os.environ.get("EDGEPRUNE_LLAMA_CPP_SRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".deps" / "llama.cpp"


def llama_source() -> LlamaSource:
    path = source_dir().resolve()
    if not (path / "CMakeLists.txt").is_file() or not (path / "tools" / "server").is_dir():
        raise EdgepruneError(
            f"llama.cpp source not found at {source_dir()}: run `make install` (it unpacks the llama-cpp-python "
            "sdist there) or set EDGEPRUNE_LLAMA_CPP_SRC to an unpacked sdist's vendor/llama.cpp."
        )
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        version = "not installed"
    # ~2800 files, ~45 MB: well under a second, so no memo that could go stale.
    return LlamaSource(path, sha256_tree(path, _BUILD_INPUTS), version)
