"""The machine edgeprune runs on: each benchmark in a fresh runner process, pinned to as many
cores as it has threads, and optionally killed when it outgrows the RAM ceiling."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeprune.devices import python_runner
from edgeprune.devices.base import TIMEOUT_S, Device, DeviceError, host_arch
from edgeprune.limits import memory_headroom
from edgeprune.measure import BenchmarkRecord, Workload
from edgeprune.runtimes import isolated
from edgeprune.runtimes.bench_worker import cpu_model

RSS_POLL_S = 0.02
# Room both models of a side-by-side benchmark need beyond their files: KV caches, compute buffers.
TOGETHER_FACTOR = 1.1
TOGETHER_SLACK = 512 << 20


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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ram_cap_bytes: int | None = None  # set from the SLO's RAM ceiling when the target asks for a cap

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

    def benchmark(self, model: Path, workload: Workload, baseline: Path | None = None) -> BenchmarkRecord:
        if baseline is None or self._together(model, baseline):
            return self._run(model, workload, baseline, self.ram_cap_bytes)
        # One model per process, alternating: each run loads (and warms up) its model afresh.
        once = replace(workload, repetitions=1)
        mine, theirs = [], []
        for _ in range(workload.repetitions):
            mine.append(self._run(model, once, None, self.ram_cap_bytes))
            if mine[-1].ram_cap_exceeded:
                return mine[-1]
            theirs.append(self._run(baseline, once, None, None))  # the cap judges the candidate alone
        return alternated(mine, theirs)

    def _together(self, model: Path, baseline: Path) -> bool:
        """Whether one process may hold both models for side-by-side runs: not under a RAM cap (it
        judges the candidate alone), and only when both stay resident with room to spare (an 8B
        Q4_K_M and its baseline make 9 GB: more than a 16 GB laptop leaves a build)."""
        if self.ram_cap_bytes is not None:
            return False
        both = model.stat().st_size + baseline.stat().st_size
        return both * TOGETHER_FACTOR + TOGETHER_SLACK <= memory_headroom()

    def _run(self, model: Path, workload: Workload, baseline: Path | None, cap: int | None) -> BenchmarkRecord:
        req = python_runner.request(workload, str(model), str(baseline) if baseline else None, self.config.pin)
        proc = subprocess.Popen([sys.executable, *python_runner.WORKER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        watch = _RamWatch(proc, cap)
        try:
            stdout, stderr = proc.communicate(req, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise DeviceError(f"Benchmarking {model.name} took over {TIMEOUT_S} s; the device is too slow for this "
                              "workload.") from None
        finally:
            watch.stop()
        if watch.exceeded:
            # An overrun is a verdict on the candidate, not a failure of edgeprune.
            return BenchmarkRecord(device=self.url, runs=[], peak_rss_bytes=watch.peak, load_s=0.0,
                                   threads=workload.threads, runtime="", system_info="", cpu=self.cpu,
                                   ram_cap_exceeded=True)
        if proc.returncode < 0:
            raise isolated.crash(proc.returncode, "benchmarking", model)
        if proc.returncode != 0:
            tail = (stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise DeviceError(f"The benchmark of {model.name} failed on {self.url}: {tail}")
        return python_runner.record(self, model, stdout)


def alternated(mine: list[BenchmarkRecord], theirs: list[BenchmarkRecord]) -> BenchmarkRecord:
    """One record from single-run records of the candidate alternated with the baseline's."""
    first = mine[0]
    return replace(
        first,
        runs=[r for rec in mine for r in rec.runs],
        baseline_runs=[r for rec in theirs for r in rec.runs],
        peak_rss_bytes=max(rec.peak_rss_bytes for rec in mine),
        load_s=float(np.median([rec.load_s for rec in mine])),
        one_model_per_process=True,
    )


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
