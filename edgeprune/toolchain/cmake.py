"""The llama.cpp build recipe: which compilers, which toolchain file, which CMake options.

One recipe for every triple. The CMake options are the cache key's heart: changing one of them
here rebuilds the binaries instead of reusing ones built another way.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edgeprune.config import Target, shipped_dir
from edgeprune.devices import host_arch
from edgeprune.errors import EdgepruneError
from edgeprune.toolchain.baseline import X86_LEVELS, x86_options

# Triple -> (architecture, Debian package with the C++ cross compiler). The C compiler's package
# is the same name with gcc.
TRIPLES = {
    "aarch64-linux-gnu": ("aarch64", "g++-aarch64-linux-gnu"),
    "arm-linux-gnueabihf": ("armv7l", "g++-arm-linux-gnueabihf"),
    "x86_64-linux-gnu": ("x86_64", "g++"),
}

COMMON_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "GGML_NATIVE": "OFF",  # never tune for the build machine
    "GGML_OPENMP": "OFF",  # no libgomp to ship; ggml's own thread pool
    "GGML_CCACHE": "OFF",
    "BUILD_SHARED_LIBS": "OFF",
    # Fully static and stripped: runs on a device with any (or an older) glibc, nothing else installed.
    "CMAKE_EXE_LINKER_FLAGS": "-static -s",
    "LLAMA_BUILD_COMMON": "ON",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",  # otherwise the configure step downloads a web UI
    "LLAMA_OPENSSL": "OFF",  # no HTTPS model downloads on the device; no cross-built OpenSSL needed
}


@dataclass(frozen=True)
class BuildSpec:
    """What the binaries are built for: the target's toolchain table plus its architecture."""

    triple: str
    cpu_flags: str

    @property
    def arch(self) -> str:
        return TRIPLES[self.triple][0]

    @property
    def cross(self) -> bool:
        return self.arch != host_arch()

    @property
    def compilers(self) -> tuple[str, str]:
        if not self.cross:
            return "gcc", "g++"
        return f"{self.triple}-gcc", f"{self.triple}-g++"

    @property
    def toolchain_file(self) -> Path | None:
        return shipped_dir("toolchain") / f"{self.triple}.cmake" if self.cross else None

    def cmake_options(self) -> dict[str, str]:
        options = dict(COMMON_OPTIONS)
        if self.arch in ("aarch64", "armv7l"):
            options["GGML_CPU_ARM_ARCH"] = self.cpu_flags  # becomes -march for ggml's CPU backend
        else:
            options |= x86_options(self.cpu_flags)
        if self.toolchain_file is not None:
            options["CMAKE_TOOLCHAIN_FILE"] = str(self.toolchain_file)
        return options

    def check_tools(self) -> None:
        """Fail before any work if a compiler or build tool is missing, naming the package."""
        c, cxx = self.compilers
        package = TRIPLES[self.triple][1]
        for tool, pkg in ((cxx, package), (c, package.replace("g++", "gcc", 1)), ("cmake", "cmake"),
                          ("ninja", "ninja-build")):
            if shutil.which(tool) is None:
                raise EdgepruneError(
                    f"{tool} is not installed, needed to build llama.cpp for {self.triple}: install the Debian "
                    f"package {pkg} (sudo apt-get install {pkg})."
                )
        if self.toolchain_file is not None and not self.toolchain_file.is_file():
            raise EdgepruneError(f"The CMake toolchain file {self.toolchain_file} is missing; restore toolchain/.")


def spec_for(target: Target) -> BuildSpec:
    triple, flags = target.toolchain.triple, target.toolchain.cpu_flags
    if triple not in TRIPLES:
        raise EdgepruneError(
            f"Target {target.name}: no llama.cpp build recipe for triple {triple}; use one of "
            f"{', '.join(sorted(TRIPLES))}."
        )
    if TRIPLES[triple][0] != target.hardware.arch:
        raise EdgepruneError(
            f"Target {target.name}: toolchain triple {triple} builds for {TRIPLES[triple][0]}, but the hardware "
            f"arch is {target.hardware.arch}; make them agree."
        )
    if TRIPLES[triple][0] == "x86_64" and flags not in X86_LEVELS:
        raise EdgepruneError(
            f"Target {target.name}: cpu_flags {flags!r} is not an x86-64 level edgeprune can build for; use one of "
            f"{', '.join(X86_LEVELS)}."
        )
    return BuildSpec(triple, flags)
