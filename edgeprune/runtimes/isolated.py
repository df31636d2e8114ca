"""Run native-runtime work in a child process, so that a crash in llama.cpp is one error, not the end of a build.

`call(doing, path, fn, *args)` runs `fn(*args)` in a fresh interpreter (`python -m
edgeprune.runtimes.isolated`: nothing of the parent, such as torch's threads or its memory, is
forked) and returns its result; `stream` does the same for a generator and yields its items as
the child produces them, so a stream of large logits is never held whole. Functions, arguments and
results travel pickled (functions by module and name). The child sends its log records to the
parent's loggers; an exception in it is raised again in the parent with its type and message; a
signal that kills it (SIGSEGV, SIGABRT, SIGKILL from the OOM killer, ...) becomes a RuntimeCrash
naming what it was doing, the model file and the signal.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from edgeprune.errors import EdgepruneError, RuntimeCrash
from edgeprune.memory import return_freed_memory

log = logging.getLogger(__name__)

_LOG, _ITEM, _RAISE = "log", "item", "raise"


def call(doing: str, path: Path, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a child process. `doing` and `path` name the work in a crash's
    sentence: "... while {doing} {path}"."""
    (result,) = _run(doing, path, fn, args, kwargs, iterate=False)
    return result


def stream(doing: str, path: Path, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """The items of `fn(*args, **kwargs)` (an iterable) produced in a child process, one at a time."""
    yield from _run(doing, path, fn, args, kwargs, iterate=True)


def crash(returncode: int, doing: str, path: Path, stderr: str = "") -> RuntimeCrash:
    """The error for a runtime process that ended with `returncode` without reporting an error itself."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGKILL:
            return RuntimeCrash(f"llama.cpp was killed (SIGKILL) while {doing} {path}: most likely the machine ran out "
                                "of memory (see `dmesg`); free memory or use a smaller model, then retry.", name)
        return RuntimeCrash(f"llama.cpp crashed ({name}) while {doing} {path}: run `edgeprune doctor` to check the "
                            "runtime build.", name)
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return RuntimeCrash(f"llama.cpp's process exited with code {returncode} while {doing} {path} ({tail}): run "
                        "`edgeprune doctor` to check the runtime build.")


def _run(doing: str, path: Path, fn: Callable[..., Any], args: tuple, kwargs: dict, iterate: bool) -> Iterator[Any]:
    request = pickle.dumps((fn, args, kwargs, iterate, _log_level()), protocol=pickle.HIGHEST_PROTOCOL)
    return_freed_memory()  # the child's memory adds to ours: hand back what we freed first
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr)
        try:
            try:
                proc.stdin.write(request)
                proc.stdin.close()
            except BrokenPipeError:  # it died before reading the request: its exit status says why
                pass
            while (message := _receive(proc.stdout)) is not None:
                kind, value = message
                if kind == _LOG:
                    logger = logging.getLogger(value.name)
                    if logger.isEnabledFor(value.levelno):
                        logger.handle(value)
                elif kind == _RAISE:
                    raise rebuild(*value)
                else:
                    yield value
            returncode = proc.wait()
        finally:  # also when the consumer stops early or the parent is interrupted
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if returncode != 0:
            stderr.seek(0)
            text = stderr.read().decode(errors="replace")
            log.debug("llama.cpp process output:\n%s", text)
            raise crash(returncode, doing, path, text)


def _log_level() -> int:
    """The lowest level the parent's edgeprune or root loggers pass on: the child need not send more."""
    return min(logging.getLogger("edgeprune").getEffectiveLevel(), logging.getLogger().getEffectiveLevel())


def _receive(channel: IO[bytes]) -> tuple[str, Any] | None:
    try:
        return pickle.load(channel)
    except (EOFError, pickle.UnpicklingError):  # the end, or a message cut short by the child's death
        return None


def rebuild(exc: BaseException | None, type_name: str, message: str, user_error: bool,
               child_traceback: str) -> BaseException:
    """The child's exception as the parent raises it: itself if it survived pickling, else a stand-in
    with the same message (an EdgepruneError stays one)."""
    if exc is None:
        exc = EdgepruneError(message) if user_error else RuntimeError(f"{type_name}: {message}")
    if not isinstance(exc, EdgepruneError):
        log.debug("in the llama.cpp process:\n%s", child_traceback)
    return exc


def portable(exc: BaseException) -> tuple[BaseException | None, str, str, bool, str]:
    """What the child sends for an exception: the exception if it pickles back, its type name and message,
    whether it is a user error, and the child's traceback."""
    child_traceback = "".join(traceback.format_exception(exc))
    try:
        copy = pickle.loads(pickle.dumps(exc.with_traceback(None)))
    except Exception:  # an exception class whose arguments do not round-trip
        copy = None
    return copy, type(exc).__name__, str(exc), isinstance(exc, EdgepruneError), child_traceback


class _Forward(logging.Handler):
    def __init__(self, send: Callable[[str, Any], None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # arguments may not pickle; the text does
        record.exc_info = record.exc_text = None
        self.send(_LOG, record)


def _child() -> None:
    channel = os.fdopen(os.dup(1), "wb")  # the parent's channel; llama.cpp's own prints go to stderr
    os.dup2(2, 1)
    lock = threading.Lock()  # llama.cpp may log from its own threads

    def send(kind: str, value: Any) -> None:
        with lock:
            pickle.dump((kind, value), channel, protocol=pickle.HIGHEST_PROTOCOL)
            channel.flush()

    try:
        fn, args, kwargs, iterate, level = pickle.load(sys.stdin.buffer)
        logging.getLogger().addHandler(_Forward(send))
        logging.getLogger().setLevel(level)
        if iterate:
            for item in fn(*args, **kwargs):
                send(_ITEM, item)
        else:
            send(_ITEM, fn(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 (everything goes back to the parent)
        send(_RAISE, portable(e))
        sys.exit(1)


if __name__ == "__main__":
    _child()
