"""The llama.cpp source tree the binaries are built from, and a version key for it.

It is the tree vendored in the llama-cpp-python sdist, so the device runs the same llama.cpp as the
host's Python runtime. Looked for in $EDGEPRUNE_LLAMA_CPP_SRC, then a checkout's .deps/llama.cpp
(`make install` unpacks it there), then the cache; an install from a wheel has neither, so on first
need the sdist of the installed version is fetched with pip (the index users install from) and its
vendor/llama.cpp unpacked into `<cache>/llama.cpp-src/<version>/`. The sdist carries no git
metadata, hence the content hash as the version.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_tree

log = logging.getLogger(__name__)

ENV = "EDGEPRUNE_LLAMA_CPP_SRC"
CACHE_SUBDIR = "llama.cpp-src"
PACKAGE = "llama-cpp-python"
VENDORED = "vendor/llama.cpp"  # where the sdist holds the tree
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


def installed_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise EdgepruneError(
            f"{PACKAGE} is not installed, so edgeprune cannot tell which llama.cpp to build: "
            f"`pip install {PACKAGE}` (or set {ENV} to a llama.cpp source tree)."
        ) from None


def _checkout_dir() -> Path:
    return Path(__file__).resolve().parents[2] / ".deps" / "llama.cpp"


def _is_tree(path: Path) -> bool:
    return (path / "CMakeLists.txt").is_file() and (path / "tools" / "server").is_dir()


def cached_dir(cache_dir: Path) -> Path:
    return cache_dir / CACHE_SUBDIR / installed_version()


def find_source(cache_dir: Path) -> Path | None:
    """Where the source is, without fetching: $EDGEPRUNE_LLAMA_CPP_SRC, the checkout's .deps, the cache."""
    if env := os.environ.get(ENV):
        path = Path(env)
        if not _is_tree(path):
            raise EdgepruneError(f"{ENV}={env} is not a llama.cpp source tree (no CMakeLists.txt and tools/server); "
                                 "point it at an unpacked llama-cpp-python sdist's vendor/llama.cpp, or unset it.")
        return path
    for path in (_checkout_dir(), cached_dir(cache_dir)):
        if _is_tree(path):
            return path
    return None


def source_dir(cache_dir: Path) -> Path:
    """The source tree, fetched into the cache if nothing has it yet."""
    return find_source(cache_dir) or fetch_source(cache_dir)


def llama_source(cache_dir: Path) -> LlamaSource:
    path = source_dir(cache_dir).resolve()
    # ~2800 files, ~45 MB: well under a second, so no memo that could go stale.
    return LlamaSource(path, sha256_tree(path, _BUILD_INPUTS), installed_version())


def fetch_source(cache_dir: Path) -> Path:
    """Download the installed version's sdist with pip and unpack its llama.cpp into the cache,
    atomically (unpacked beside it, then renamed: a crash leaves no half tree under the name)."""
    version = installed_version()
    dest = cached_dir(cache_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("llama.cpp source not found: fetching the %s %s sdist with pip into %s", PACKAGE, version, dest)
    with tempfile.TemporaryDirectory(prefix=f"{version}.tmp-", dir=dest.parent) as tmp:
        sdist = _download(version, Path(tmp) / "download")
        tree = Path(tmp) / "llama.cpp"
        _extract_vendored(sdist, tree)
        if not _is_tree(tree):
            raise EdgepruneError(f"{sdist.name} holds no {VENDORED} source tree; set {ENV} to a llama.cpp checkout.")
        try:
            tree.rename(dest)
        except OSError:  # another process unpacked it first
            if not _is_tree(dest):
                raise
    log.info("llama.cpp source unpacked into %s", dest)
    return dest


def _download(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"{PACKAGE}=={version}", "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(into.glob("*.tar.gz")) if into.is_dir() else []
    if proc.returncode != 0 or not sdists:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        reason = lines[-1][:200] if lines else f"exit status {proc.returncode}"
        raise EdgepruneError(
            f"Could not fetch the {PACKAGE} {version} sdist that holds llama.cpp's source with pip ({reason}); "
            f"connect to your package index (or point PIP_FIND_LINKS at a directory holding it), or set {ENV} "
            "to an unpacked sdist's vendor/llama.cpp."
        )
    return sdists[0]


def _extract_vendored(sdist: Path, dest: Path) -> None:
    """Unpack `<top>/vendor/llama.cpp/**` of the sdist into `dest`, member by member (tarfile's
    `filter="data"` is not on every Python 3.10/3.11 patch release): regular files, directories and
    symlinks, each landing and pointing inside `dest`; anything else is refused."""
    dest.mkdir()
    root = os.path.realpath(dest)

    def inside(path: str) -> bool:
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    def refuse(member: tarfile.TarInfo, why: str) -> EdgepruneError:
        return EdgepruneError(f"{sdist} is not a genuine sdist ({member.name}: {why}); delete it and fetch it again.")

    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf:
            parts = PurePosixPath(member.name).parts
            if member.name.startswith("/") or ".." in parts:
                raise refuse(member, "a path outside the archive's tree")
            if len(parts) < 4 or PurePosixPath(*parts[1:3]) != PurePosixPath(VENDORED):
                continue
            target = dest.joinpath(*parts[3:])
            if not inside(str(target.parent)) or os.path.lexists(target) and not member.isdir():
                raise refuse(member, "written through a link, or twice")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(member) as src, open(target, "wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, out)
                os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
            elif member.issym() and not os.path.isabs(member.linkname) and inside(
                    os.path.join(target.parent, member.linkname)):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(member.linkname, target)
            else:
                raise refuse(member, "a hard link, device, or a link pointing outside the tree")
