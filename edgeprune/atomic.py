"""Replacing a file whole: written aside under a reserved name, then renamed over it.

The reserved prefix keeps a temporary file from ever being mistaken for a real one (a bundle's
checksums, say) when a killed process leaves it behind; `remove_leftovers` clears those."""

from __future__ import annotations

import logging
import os
import tempfile
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
