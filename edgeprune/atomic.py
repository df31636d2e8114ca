"""Files and directories written whole, safe with concurrent and killed writers.

Files: written aside under a reserved name, then renamed over the real one. The reserved prefix
keeps a temporary file from ever being mistaken for a real one (a bundle's checksums, say) when a
killed process leaves it behind; `remove_leftovers` clears those.

Directories: a writer fills a temporary sibling `<name>.tmp-<host>@<pid>-<random>` and renames it
when complete, so readers never see a half-written directory. A cache entry is built under an exclusive lock on
`<name>.lock` (fcntl.flock, released by the kernel when its holder dies, even by SIGKILL): two
builds sharing a cache compute it once, the second waits and reuses it. Temporary directories whose
writer is dead are swept by the next writer on the same machine; the host and pid in the name say
whose they are. A cache shared by several machines (a Ray cluster's nodes over NFS) is safe: a
writer never sweeps another machine's temporary directories, whose pids it cannot check.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

TMP_PREFIX = ".edgeprune-tmp-"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_leftovers(directory: Path, legacy: tuple[str, ...] = ()) -> list[str]:
    """Delete the temporary files an interrupted writer left in `directory` (regular files with the
    reserved prefix, or one of the `legacy` names earlier versions used); their names."""
    removed = []
    for entry in os.scandir(directory):
        if (entry.name.startswith(TMP_PREFIX) or entry.name in legacy) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
            log.warning("removed %s, left behind by an interrupted run", Path(entry.path))
    return removed


TMP = ".tmp-"
_OWNER = re.compile(r"\.tmp-(?:([A-Za-z0-9_.-]+)@)?(\d+)-[a-z0-9_]+$")  # no host: written by an older version
_HOST = os.uname().nodename.replace("@", "_") or "localhost"


def make_tmp(final: Path) -> Path:
    """An empty temporary sibling of `final` that names this process as its writer."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{final.name}{TMP}{_HOST}@{os.getpid()}-", dir=final.parent))


def sweep(directory: Path, prefix: str = "") -> int:
    """Remove the temporary directories `<prefix>*.tmp-*` in `directory` whose writer is dead."""
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.glob(f"{glob.escape(prefix)}*{TMP}*") if p.is_dir() and not _writer_alive(p)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log.info("removed %d temporary director%s left by killed builds in %s", len(stale),
                 "y" if len(stale) == 1 else "ies", directory)
    return len(stale)


def _writer_alive(tmp: Path) -> bool:
    m = _OWNER.search(tmp.name)
    if m is None:  # written before the pid was recorded: nobody alive can be filling it
        return False
    if m.group(1) not in (None, _HOST):  # another machine's: its pid cannot be checked from here
        return True
    pid = int(m.group(2))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def locked(final: Path) -> Iterator[None]:
    """Hold the exclusive lock of `final` (waiting for another process that holds it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(f"{final.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another build that is writing %s", final)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing


def build_once(final: Path, complete: Callable[[Path], bool], fill: Callable[[Path], object]) -> bool:
    """Make `final` complete: `fill` a temporary directory and rename it into place, under the lock,
    unless another process completed it meanwhile. True when this call built it."""
    with locked(final):
        if complete(final):
            return False
        tmp = make_tmp(final)
        try:
            fill(tmp)
            if final.exists():  # incomplete (damaged by hand, or an older layout): replaced
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def discard(final: Path) -> None:
    """Remove the complete directory `final`, under its lock: renamed aside first (a name `sweep`
    removes), so a reader sees it whole or gone, never half-deleted."""
    with locked(final):
        if not final.exists():
            return
        aside = make_tmp(final)
        aside.rmdir()
        final.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)
