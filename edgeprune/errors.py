"""User-facing errors: one sentence naming the input at fault and what to do."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager


class EdgepruneError(Exception):
    """An error caused by the user's input or environment; the CLI prints it without a traceback."""


class BudgetNotMet(EdgepruneError):
    """The search ended without a candidate within the target's budget."""


class VerificationFailed(EdgepruneError):
    """A bundle is not intact, not authentic, or does not run correctly on its device."""


# errno -> what the user is told when the system refuses a write (or, for permissions, any access).
_ELSEWHERE = "--cache-dir/--output-dir elsewhere"
_SYSTEM_REFUSALS = {
    errno.ENOSPC: ("No space left on device while writing", f"free space or use {_ELSEWHERE}"),
    errno.EDQUOT: ("Disk quota exceeded while writing", f"free space or use {_ELSEWHERE}"),
    errno.EROFS: ("Read-only file system: cannot write", f"use {_ELSEWHERE}"),
    errno.EACCES: ("Permission denied for", f"check its permissions or use {_ELSEWHERE}"),
    errno.EPERM: ("Operation not permitted on", f"check its permissions or use {_ELSEWHERE}"),
}


# Rust libraries (safetensors, tokenizers) raise their own exception types for I/O errors, naming the errno.
_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")
# numpy's tofile (the gguf writer's) reports a short write, a full disk, as an OSError without errno.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno is None and _SHORT_WRITE.match(str(e)):
        return errno.ENOSPC
    if isinstance(e, OSError):
        return e.errno
    match = _RUST_IO_ERROR.search(str(e))
    return int(match.group(1)) if match else None


def system_refusal(e: BaseException, writing: object = None) -> EdgepruneError | None:
    """Disk full, read-only or permission denied as one sentence; None for any other error, which
    is a bug's and keeps its traceback. A full or read-only disk names `writing`, what was being
    written (a failed write's error often carries no file name); a refused permission names its file."""
    code = _errno(e)
    known = _SYSTEM_REFUSALS.get(code)  # type: ignore[arg-type]
    if known is None or isinstance(e, EdgepruneError):
        return None
    what, advice = known
    where = writing if writing is not None and code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None
    return EdgepruneError(f"{what} {where or getattr(e, 'filename', None) or writing or 'a file'}: {advice}.")


@contextmanager
def naming_refusals(writing: object) -> Iterator[None]:
    """Inside: a full or read-only disk, or a refused permission, becomes one sentence (see system_refusal)."""
    try:
        yield
    except Exception as e:
        refusal = system_refusal(e, writing)
        if refusal is None:
            raise
        raise refusal from None


class RuntimeCrash(EdgepruneError):
    """A native runtime (llama.cpp) died in its child process: a signal, or an exit without a Python error."""

    def __init__(self, message: str, signal_name: str | None = None) -> None:
        super().__init__(message)
        self.signal_name = signal_name

    def __reduce__(self):  # crosses process boundaries pickled, attribute included
        return type(self), (str(self), self.signal_name)
