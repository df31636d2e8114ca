"""User-facing errors: one sentence naming the input at fault and what to do."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


class EdgepruneError(Exception):
    """An error caused by the user's input or environment; the CLI prints it without a traceback."""


class BudgetNotMet(EdgepruneError):
    """The search ended without a candidate within the target's budget."""


# errno -> what the user is told when the system refuses a write (or, for permissions, any access).
_ELSEWHERE = "--cache-dir/--output-dir elsewhere"
_SYSTEM_REFUSALS = {
    errno.ENOSPC: ("No space left on device while writing", f"free space or use {_ELSEWHERE}"),
    errno.EDQUOT: ("Disk quota exceeded while writing", f"free space or use {_ELSEWHERE}"),
    errno.EROFS: ("Read-only file system: cannot write", f"use {_ELSEWHERE}"),
    errno.EACCES: ("Permission denied for", f"check its permissions or use {_ELSEWHERE}"),
    errno.EPERM: ("Operation not permitted on", f"check its permissions or use {_ELSEWHERE}"),
}


def system_refusal(e: OSError, writing: object = None) -> EdgepruneError | None:
    """Disk full, read-only or permission denied as one sentence; None for any other OSError, which
    is a bug's and keeps its traceback. A full or read-only disk names `writing`, what was being
    written (a failed write's error often carries no file name); a refused permission names its file."""
    known = _SYSTEM_REFUSALS.get(e.errno)  # type: ignore[arg-type]
    if known is None:
        return None
    what, advice = known
    where = writing if writing is not None and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None
    return EdgepruneError(f"{what} {where or e.filename or writing or 'a file'}: {advice}.")


@contextmanager
def naming_refusals(writing: object) -> Iterator[None]:
    """Inside: a full or read-only disk, or a refused permission, becomes one sentence (see system_refusal)."""
    try:
        yield
    except OSError as e:
        refusal = system_refusal(e, writing)
        if refusal is None:
            raise
        raise refusal from None
