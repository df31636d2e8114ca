"""Build (or reuse) llama.cpp's binaries for one BuildSpec, cached by (source, triple, flags, recipe).

A cache entry is a directory `<cache>/toolchain/<triple>-<key>/` holding `bin/` and
`build-info.json`; it appears by rename only when complete. A file lock serialises builds of the
same entry, so parallel tests or builds wait for one compile instead of running two.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file, sha256_json
from edgeprune.toolchain.cmake import BuildSpec
from edgeprune.toolchain.source import LlamaSource, llama_source

log = logging.getLogger(__name__)

# llama-completion is the scriptable one-shot generator verification reads text from; llama-cli is
# the interactive chat, llama-server the HTTP server, llama-bench the benchmark.
TOOLS = ("llama-cli", "llama-completion", "llama-server", "llama-bench")
INFO = "build-info.json"


@dataclass(frozen=True)
class Binaries:
    dir: Path  # the cache entry; binaries in dir / "bin"
    info: dict[str, Any]

    @property
    def bin(self) -> Path:
        return self.dir / "bin"

    def path(self, tool: str) -> Path:
        return self.bin / tool


def cache_key(spec: BuildSpec, source: LlamaSource) -> str:
    toolchain = spec.toolchain_file
    return sha256_json({
        "source": source.digest,
        "triple": spec.triple,
        "cpu_flags": spec.cpu_flags,
        "options": spec.cmake_options() | {"CMAKE_TOOLCHAIN_FILE": None},  # its content, not its path
        "toolchain_file": sha256_file(toolchain) if toolchain else None,
        "tools": TOOLS,
    })[:16]


def _entry(spec: BuildSpec, source: LlamaSource, cache_dir: Path) -> Path:
    # Absolute: cmake runs in the build tree.
    return cache_dir.resolve() / "toolchain" / f"{spec.triple}-{cache_key(spec, source)}"


def _cached(entry: Path) -> Binaries | None:
    info = entry / INFO
    return Binaries(entry, json.loads(info.read_text())) if info.is_file() else None


def cached_binaries(spec: BuildSpec, source: LlamaSource, cache_dir: Path) -> Binaries | None:
    return _cached(_entry(spec, source, cache_dir))


def check_buildable(spec: BuildSpec, cache_dir: Path) -> None:
    """Fail now, not after a long search, if the binaries are neither cached nor buildable here."""
    if cached_binaries(spec, llama_source(cache_dir), cache_dir) is None:
        spec.check_tools()


def ensure_binaries(spec: BuildSpec, cache_dir: Path, jobs: int | None = None) -> Binaries:
    """The binaries for `spec`, built now if no cache entry has them."""
    source = llama_source(cache_dir)
    entry = _entry(spec, source, cache_dir)
    if (found := _cached(entry)) is not None:
        return found
    spec.check_tools()
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.with_name(f"{entry.name}.lock")):
        if (found := _cached(entry)) is not None:  # another process built it while we waited
            return found
        _clear(entry)
        return _build(spec, source, cache_key(spec, source), entry, jobs or len(os.sched_getaffinity(0)))


def _clear(entry: Path) -> None:
    """Remove what stands where a cache entry goes without being one (a broken link, a directory
    without its info file): the finished build is renamed there."""
    if entry.is_symlink() or entry.is_file():
        entry.unlink()
    elif entry.exists():
        shutil.rmtree(entry)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(spec: BuildSpec, source: LlamaSource, key: str, entry: Path, jobs: int) -> Binaries:
    # The build tree is kept after a failure, so a retry resumes where ninja stopped.
    work = entry.with_name(f"{entry.name}.build")
    work.mkdir(exist_ok=True)
    log_path = work / "build.log"
    env = os.environ | {
        # The sdist has no .git: stop git from finding an enclosing repository (edgeprune's own, when
        # .deps/ lives in it) and baking that commit into the binaries' build info.
        "GIT_CEILING_DIRECTORIES": str(source.path.parent),
    }
    configure = ["cmake", "-S", str(source.path), "-B", str(work / "cmake"), "-G", "Ninja",
                 *(f"-D{k}={v}" for k, v in spec.cmake_options().items())]
    compile_ = ["cmake", "--build", str(work / "cmake"), "-j", str(jobs), "--target", *TOOLS]
    log.info("building llama.cpp %s for %s (-march=%s) with %d jobs: about 10 minutes on 2 cores, once; "
             "log in %s", ", ".join(TOOLS), spec.triple, spec.cpu_flags, jobs, log_path)
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        for cmd in (configure, compile_):
            logf.write(f"$ {shlex.join(cmd)}\n")
            logf.flush()
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=work)
            if proc.returncode != 0:
                raise EdgepruneError(
                    f"Building llama.cpp for {spec.triple} failed ({_last_error(log_path)}); see {log_path}."
                )
    seconds = time.perf_counter() - t0

    tmp = entry.with_name(f"{entry.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True)
    for tool in TOOLS:
        shutil.copy2(work / "cmake" / "bin" / tool, tmp / "bin" / tool)
    info = {
        "key": key,
        "triple": spec.triple,
        "arch": spec.arch,
        "cpu_flags": spec.cpu_flags,
        "llama_cpp": source.version,
        "llama_cpp_source_sha256": source.digest,
        "compiler": _compiler_version(spec),
        "cmake_options": {k: v for k, v in spec.cmake_options().items() if k != "CMAKE_TOOLCHAIN_FILE"},
        "toolchain_file": spec.toolchain_file.name if spec.toolchain_file else None,
        "build_seconds": round(seconds, 1),
        "jobs": jobs,
        "files": {tool: sha256_file(tmp / "bin" / tool) for tool in TOOLS},
    }
    (tmp / INFO).write_text(json.dumps(info, indent=1))
    tmp.rename(entry)
    shutil.rmtree(work, ignore_errors=True)
    log.info("built llama.cpp for %s in %.0f s: %s", spec.triple, seconds, entry / "bin")
    return Binaries(entry, info)


def _compiler_version(spec: BuildSpec) -> str:
    out = subprocess.run([spec.compilers[1], "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else spec.compilers[1]


def _last_error(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1].strip()[:300]
