"""Fixed instruction-set baselines: what llama.cpp is compiled for, on the host and for a device.

Never "whatever the build machine has" (GGML_NATIVE): a native build of llama-cpp-python on an
Intel Xeon with AMX compiles ggml's AMX kernels, which crash on the first decode of any quantized
GGUF. The host runtime is built for one documented level per architecture instead, the same level
the `demo` bundle is built for, so host and bundle run the same kernels.

Standard library only: `make install` runs this file with the system Python, before any venv
exists, to get the CMAKE_ARGS for llama-cpp-python (`python3 edgeprune/toolchain/baseline.py
cmake-args`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys

# x86-64 micro-architecture levels -> ggml's instruction-set switches. With GGML_NATIVE=OFF ggml
# otherwise turns AVX2/FMA/F16C on, which an x86-64-v2 device cannot execute. AMX is never on.
X86_LEVELS = {
    "x86-64": (),
    "x86-64-v2": ("SSE42",),
    "x86-64-v3": ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C"),
    "x86-64-v4": ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C", "AVX512"),
}
X86_SWITCHES = ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C", "AVX512")
# /proc/cpuinfo flags each switch needs, to tell a host that cannot run a level before it crashes.
X86_CPU_FLAGS = {"SSE42": "sse4_2", "AVX": "avx", "AVX2": "avx2", "BMI2": "bmi2", "FMA": "fma", "F16C": "f16c",
                 "AVX512": "avx512f"}
ARM_CPU_FLAGS = {"dotprod": "asimddp"}

# The host runtime's level per architecture. x86-64-v3: every x86-64 server and laptop CPU since
# 2015 (Haswell, Zen). aarch64 armv8.2-a+dotprod: Graviton2 and later, Ampere Altra, Neoverse,
# Apple silicon; a Cortex-A72-class host (Graviton1, Raspberry Pi 4) needs EDGEPRUNE_HOST_BASELINE=armv8-a.
HOST_BASELINES = {"x86_64": "x86-64-v3", "aarch64": "armv8.2-a+dotprod"}
BASELINE_ENV = "EDGEPRUNE_HOST_BASELINE"
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def machine() -> str:
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def host_baseline() -> str:
    return os.environ.get(BASELINE_ENV) or HOST_BASELINES.get(machine(), "")


def x86_options(level: str) -> dict[str, str]:
    enabled = X86_LEVELS[level]
    options = {f"GGML_{s}": "ON" if s in enabled else "OFF" for s in X86_SWITCHES}
    options["CMAKE_C_FLAGS"] = options["CMAKE_CXX_FLAGS"] = f"-march={level}"
    return options


def host_cmake_options(baseline: str | None = None) -> dict[str, str]:
    """CMake options for the host's llama-cpp-python: no native tuning, no AMX, one fixed level."""
    baseline = baseline or host_baseline()
    options = {"GGML_NATIVE": "OFF", "GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF"}
    if baseline in X86_LEVELS:
        options |= x86_options(baseline)
    elif baseline.startswith("armv"):
        options["GGML_CPU_ARM_ARCH"] = baseline
    else:
        raise SystemExit(f"No host baseline for a {machine()} machine: set {BASELINE_ENV} to an x86-64 level "
                         f"({', '.join(X86_LEVELS)}) or an ARM -march value (e.g. armv8-a).")
    return options


def missing_cpu_features(baseline: str | None = None, cpuinfo: str | None = None) -> list[str]:
    """The baseline's instruction sets this CPU lacks (empty when unknown: no /proc/cpuinfo)."""
    baseline = baseline or host_baseline()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        return []
    if baseline in X86_LEVELS:
        wanted = [X86_CPU_FLAGS[s] for s in X86_LEVELS[baseline]]
    else:
        wanted = [flag for ext, flag in ARM_CPU_FLAGS.items() if f"+{ext}" in baseline]
    return [f for f in wanted if f not in flags]


def cmake_args(options: dict[str, str]) -> str:
    return " ".join(f"-D{k}={v}" for k, v in options.items())


def wheel_key(version: str, baseline: str | None = None) -> str:
    """Directory name of a host wheel: the version, the level and a hash of the exact options."""
    baseline = baseline or host_baseline()
    digest = hashlib.sha256(cmake_args(host_cmake_options(baseline)).encode()).hexdigest()[:10]
    return f"llama-cpp-python-{version}-{machine()}-{baseline.replace('+', '_')}-{digest}"


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "cmake-args"
    if what == "cmake-args":
        print(cmake_args(host_cmake_options()))
    elif what == "wheel-key":
        print(wheel_key(sys.argv[2]))
    elif what == "baseline":
        print(host_baseline())
    else:
        raise SystemExit(f"unknown request {what!r}: cmake-args | wheel-key VERSION | baseline")
