"""The llama.cpp build recipe, its cache, and a real aarch64 cross-build."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from edgeprune.config import load_target
from edgeprune.errors import EdgepruneError
from edgeprune.toolchain import TOOLS, BuildSpec, ensure_binaries, spec_for
from edgeprune.toolchain.build import cache_key
from edgeprune.toolchain.source import llama_source


def test_arm_target_builds_for_its_cpu_flags_without_native_tuning():
    spec = spec_for(load_target("arm16g"))
    assert spec == BuildSpec("aarch64-linux-gnu", "armv8.2-a+dotprod") and spec.cross
    options = spec.cmake_options()
    assert options["GGML_CPU_ARM_ARCH"] == "armv8.2-a+dotprod" and options["GGML_NATIVE"] == "OFF"
    assert options["BUILD_SHARED_LIBS"] == "OFF" and "-static" in options["CMAKE_EXE_LINKER_FLAGS"]
    assert options["LLAMA_USE_PREBUILT_UI"] == "OFF"  # no download at configure time
    assert options["CMAKE_TOOLCHAIN_FILE"].endswith("toolchain/aarch64-linux-gnu.cmake")
    assert spec.compilers == ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")


def test_x86_level_sets_ggml_instruction_sets():
    spec = spec_for(load_target("demo"))
    options = spec.cmake_options()
    assert not spec.cross and spec.toolchain_file is None
    assert options["GGML_AVX2"] == "ON" and options["GGML_FMA"] == "ON" and options["GGML_AVX512"] == "OFF"
    assert options["CMAKE_C_FLAGS"] == "-march=x86-64-v3"
    # x86-64-v2 has SSE4.2 but no AVX: ggml must not enable AVX2/FMA on its own.
    options = BuildSpec("x86_64-linux-gnu", "x86-64-v2").cmake_options()
    assert options["GGML_SSE42"] == "ON" and options["GGML_AVX2"] == "OFF" and options["GGML_FMA"] == "OFF"
    assert options["CMAKE_C_FLAGS"] == "-march=x86-64-v2"


def test_cache_key_follows_source_triple_and_flags():
    source = llama_source()
    a = cache_key(BuildSpec("aarch64-linux-gnu", "armv8.2-a+dotprod"), source)
    assert a == cache_key(BuildSpec("aarch64-linux-gnu", "armv8.2-a+dotprod"), source)
    assert a != cache_key(BuildSpec("aarch64-linux-gnu", "armv8-a"), source)
    assert a != cache_key(BuildSpec("x86_64-linux-gnu", "x86-64-v2"), source)
    other = source.__class__(source.path, "0" * 64, source.llama_cpp_python)
    assert a != cache_key(BuildSpec("aarch64-linux-gnu", "armv8.2-a+dotprod"), other)


def test_target_whose_triple_contradicts_its_arch_is_refused(tmp_path):
    path = tmp_path / "odd.toml"
    path.write_text("""description = "x"
[hardware]
arch = "aarch64"
cores = 4
ram_gib = 4
memory_bandwidth_gbs = 10
[slo]
prompt_tokens = 8
answer_tokens = 8
latency_budget_s = 1
[toolchain]
triple = "x86_64-linux-gnu"
cpu_flags = "x86-64-v2"
""")
    with pytest.raises(EdgepruneError, match="builds for x86_64, but the hardware arch is aarch64"):
        spec_for(load_target(str(path)))
    path.write_text(path.read_text().replace('triple = "x86_64-linux-gnu"', 'triple = "riscv64-linux-gnu"'))
    with pytest.raises(EdgepruneError, match="no llama.cpp build recipe for triple riscv64-linux-gnu"):
        spec_for(load_target(str(path)))


def test_missing_cross_compiler_names_the_debian_package(tmp_path, monkeypatch):
    # A PATH with cmake and ninja but no cross compiler, as on a machine without the package.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("cmake", "ninja"):
        (bindir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bindir))
    cache = tmp_path / "cache"
    with pytest.raises(EdgepruneError, match=r"install the Debian package g\+\+-aarch64-linux-gnu"):
        ensure_binaries(BuildSpec("aarch64-linux-gnu", "armv8-a"), cache)
    assert not (cache / "toolchain").exists()  # failed before any work


@pytest.fixture(scope="session")
def arm_binaries(cache_dir):
    """aarch64 llama.cpp, built once per cache (~10-25 min on 2 cores), shared by every test."""
    return ensure_binaries(spec_for(load_target("arm16g")), cache_dir)


@pytest.mark.slow
def test_aarch64_binaries_are_static_arm_executables(arm_binaries):
    for tool in TOOLS:
        desc = subprocess.run(["file", "-L", str(arm_binaries.path(tool))], capture_output=True, text=True).stdout
        assert "ARM aarch64" in desc and "statically linked" in desc, desc
    info = arm_binaries.info
    assert info["cpu_flags"] == "armv8.2-a+dotprod" and info["triple"] == "aarch64-linux-gnu"
    assert info["llama_cpp_source_sha256"] == llama_source().digest


@pytest.mark.slow
def test_aarch64_binaries_run_under_qemu(arm_binaries):
    proc = subprocess.run(["qemu-aarch64", str(arm_binaries.path("llama-cli")), "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "version" in (proc.stdout + proc.stderr)


@pytest.mark.slow
def test_toolchain_build_command_reuses_the_cache(arm_binaries, cache_dir):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "toolchain", "build", "--target", "arm16g",
                           "--cache-dir", str(cache_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - t0 < 60  # a cache hit: no compile
    assert str(arm_binaries.path("llama-server")) in proc.stdout
    assert "armv8.2-a+dotprod" in proc.stdout
