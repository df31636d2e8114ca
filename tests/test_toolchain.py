"""The llama.cpp build recipe, its cache, and a real aarch64 cross-build."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import REPO
from edgeprune.config import load_target
from edgeprune.errors import EdgepruneError
from edgeprune.toolchain import TOOLS, BuildSpec, ensure_binaries, spec_for
from edgeprune.toolchain.build import cache_key
from edgeprune.toolchain.source import _extract_vendored, fetch_source, installed_version, llama_source


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


def test_cache_key_follows_source_triple_and_flags(cache_dir):
    source = llama_source(cache_dir)
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
def test_aarch64_binaries_are_static_arm_executables(arm_binaries, cache_dir):
    for tool in TOOLS:
        desc = subprocess.run(["file", "-L", str(arm_binaries.path(tool))], capture_output=True, text=True).stdout
        assert "ARM aarch64" in desc and "statically linked" in desc, desc
    info = arm_binaries.info
    assert info["cpu_flags"] == "armv8.2-a+dotprod" and info["triple"] == "aarch64-linux-gnu"
    assert info["llama_cpp_source_sha256"] == llama_source(cache_dir).digest


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


# --- where the llama.cpp source comes from -----------------------------------------------------------

def test_source_lookup_prefers_the_environment_then_the_checkout(tmp_path, monkeypatch):
    checkout = REPO / ".deps" / "llama.cpp"
    assert llama_source(tmp_path).path == checkout.resolve()  # before the (empty) cache, and no fetch
    assert not (tmp_path / "llama.cpp-src").exists()
    monkeypatch.setenv("EDGEPRUNE_LLAMA_CPP_SRC", str(tmp_path))
    with pytest.raises(EdgepruneError, match=f"EDGEPRUNE_LLAMA_CPP_SRC={tmp_path} is not a llama.cpp source tree"):
        llama_source(tmp_path)


def test_toolchain_commands_show_the_source_and_the_cache(tmp_path):
    env = os.environ | {"EDGEPRUNE_CACHE": str(tmp_path)}
    run = [sys.executable, "-m", "edgeprune", "toolchain"]
    status = subprocess.run(run, capture_output=True, text=True, env=env)
    assert status.returncode == 0, status.stderr
    digest = llama_source(tmp_path).digest[:12]
    assert f"llama.cpp source:  {(REPO / '.deps' / 'llama.cpp').resolve()}" in status.stdout and digest in status.stdout
    assert "arm16g       aarch64-linux-gnu -march=armv8.2-a+dotprod: not built" in status.stdout
    source = subprocess.run(run + ["source"], capture_output=True, text=True, env=env)
    assert source.returncode == 0 and source.stdout.strip() == str(REPO / ".deps" / "llama.cpp")


def test_a_failed_fetch_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "links").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline, and the sdist is nowhere to be found
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    cache = tmp_path / "cache"
    with pytest.raises(EdgepruneError, match=rf"Could not fetch the llama-cpp-python {installed_version()} sdist "
                       ".* with pip .*; connect to your package index .* set EDGEPRUNE_LLAMA_CPP_SRC"):
        fetch_source(cache)
    assert list((cache / "llama.cpp-src").iterdir()) == []


def _sdist(path, members):
    """A tar.gz of (name, kind, payload) members under llama_cpp_python-X/, as an sdist lays them out."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name if name.startswith("/") else f"llama_cpp_python-9/{name}")
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                info.type, info.linkname = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind], payload
                tf.addfile(info)
    return path


GOOD = [("vendor/llama.cpp/CMakeLists.txt", "file", b"cmake"), ("vendor/llama.cpp/tools/server/a.cpp", "file", b"a"),
        ("vendor/llama.cpp/tools/alias.cpp", "symlink", "server/a.cpp"), ("README.md", "file", b"not vendored")]


@pytest.mark.parametrize("bad, needle", [
    ([("vendor/llama.cpp/../../escape", "file", b"x")], "a path outside"),
    ([("/tmp/edgeprune-escape", "file", b"x")], "a path outside"),
    ([("vendor/llama.cpp/out", "symlink", "../../../../outside")], "pointing outside"),
    ([("vendor/llama.cpp/abs", "symlink", "/etc/passwd")], "pointing outside"),
    ([("vendor/llama.cpp/hard", "hardlink", "/etc/passwd")], "a hard link"),
    ([("vendor/llama.cpp/here", "symlink", "."), ("vendor/llama.cpp/here/up", "symlink", "..")], "pointing outside"),
    ([("vendor/llama.cpp/CMakeLists.txt", "symlink", "tools")], "written through a link, or twice"),
])
def test_unpacking_refuses_members_that_leave_the_tree(tmp_path, bad, needle):
    good = tmp_path / "good"
    _extract_vendored(_sdist(tmp_path / "good.tar.gz", GOOD), good)
    assert sorted(str(p.relative_to(good)) for p in good.rglob("*")) == [
        "CMakeLists.txt", "tools", "tools/alias.cpp", "tools/server", "tools/server/a.cpp"]
    assert (good / "tools" / "alias.cpp").read_bytes() == b"a"
    with pytest.raises(EdgepruneError, match=f"is not a genuine sdist .*{needle}"):
        _extract_vendored(_sdist(tmp_path / "bad.tar.gz", [GOOD[0], *bad, *GOOD[1:]]), tmp_path / "bad")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "outside").exists()
    assert not os.path.lexists("/tmp/edgeprune-escape")


def test_what_stands_where_a_cache_entry_goes_is_cleared_before_a_build(tmp_path):
    """A broken link or an unfinished directory at the entry's path would fail the final rename,
    after the compile: it is removed first (the caller holds the entry's lock)."""
    from edgeprune.toolchain.build import _cached, _clear

    broken = tmp_path / "x86_64-linux-gnu-0123"
    broken.symlink_to(tmp_path / "gone")
    assert _cached(broken) is None
    _clear(broken)
    assert not broken.is_symlink() and not broken.exists()

    unfinished = tmp_path / "aarch64-linux-gnu-4567"
    (unfinished / "bin").mkdir(parents=True)
    (unfinished / "bin" / "llama-cli").write_bytes(b"\x7fELF")
    assert _cached(unfinished) is None
    _clear(unfinished)
    assert not unfinished.exists()
    _clear(unfinished)  # nothing there: nothing to do
