"""The machine edgeprune runs on: each benchmark in a fresh runner process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgeprune.devices.base import Device, host_arch
from edgeprune.errors import EdgepruneError
from edgeprune.measure import BenchmarkRecord, Workload

TIMEOUT_S = 1800


class LocalDevice(Device):
    scheme = "local"

    @property
    def arch(self) -> str:
        return host_arch()

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0))

    def benchmark(self, model: Path, workload: Workload, baseline: Path | None = None) -> BenchmarkRecord:
        request = workload.to_dict() | {"model": str(model), "baseline": str(baseline) if baseline else None}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "edgeprune.runtimes.bench_worker"],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise EdgepruneError(
                f"Benchmarking {model.name} took over {TIMEOUT_S} s; the device is too slow for this workload."
            ) from None
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgepruneError(f"The benchmark of {model.name} failed on {self.url}: {tail}")
        raw = json.loads(proc.stdout)
        return BenchmarkRecord(device=self.url, **raw)
