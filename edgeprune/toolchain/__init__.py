"""llama.cpp binaries for a target: cross-compiled from the source llama-cpp-python was built from."""

from edgeprune.toolchain.build import TOOLS, Binaries, check_buildable, ensure_binaries
from edgeprune.toolchain.cmake import BuildSpec, spec_for

__all__ = ["TOOLS", "Binaries", "BuildSpec", "check_buildable", "ensure_binaries", "spec_for"]
