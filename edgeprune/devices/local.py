"""The machine edgeprune runs on: workers are processes here, optionally killed when they
outgrow a RAM cap."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgeprune.cpu import cpu_model
from edgeprune.devices.base import TIMEOUT_S, Device, DeviceError, WorkerRun, host_arch
from edgeprune.limits import memory_headroom

RSS_POLL_S = 0.02


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class LocalDevice(Device):
    scheme = "local"

    @property
    def arch(self) -> str:
        return host_arch()

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0))

    @property
    def cpu(self) -> str:
        return cpu_model()

    def exec(self, argv: list[str], what: str, stdin: bytes | Path | None = None,
             timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        return run_local(argv, what, stdin, timeout)

    @property
    def python(self) -> str:
        return sys.executable

    def memory_headroom(self) -> int:
        return memory_headroom()

    def run_worker(self, argv: list[str], request: bytes, what: str, ram_cap: int | None = None) -> WorkerRun:
        proc = subprocess.Popen([self.python, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        watch = _RamWatch(proc, ram_cap)
        try:
            stdout, stderr = proc.communicate(request, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise DeviceError(f"{what[:1].upper()}{what[1:]} took over {TIMEOUT_S} s; the device is too slow for "
                              "this workload.") from None
        finally:
            watch.stop()
        return WorkerRun(proc.returncode, stdout, stderr, watch.peak, watch.exceeded)


class _RamWatch:
    """Polls a process's RSS and kills it past `cap` bytes (no cap: only records the peak)."""

    def __init__(self, proc: subprocess.Popen, cap: int | None) -> None:
        self.proc, self.cap, self.peak, self.exceeded = proc, cap, 0, False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if cap is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set() and self.proc.poll() is None:
            rss = _rss_bytes(self.proc.pid)
            self.peak = max(self.peak, rss)
            if rss > self.cap:
                self.exceeded = True
                self.proc.kill()
                return
            time.sleep(RSS_POLL_S)

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()


def run_local(argv: list[str], what: str, stdin: bytes | Path | None = None,
              timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a program here; its failure becomes one sentence naming `what`."""
    try:
        if isinstance(stdin, Path):
            with stdin.open("rb") as f:
                proc = subprocess.run(argv, stdin=f, capture_output=True, timeout=timeout)
        else:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{what} did not finish within {timeout:g} s.") from None
    except OSError as e:
        raise DeviceError(f"{what} could not start: {e}.") from None
    if proc.returncode != 0:
        tail = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc
