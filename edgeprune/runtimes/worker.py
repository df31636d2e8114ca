"""Timing through a Python worker process on the device (`python -m <worker> < request.json`),
for any runtime with a Python binding: the request, the record, and when the candidate and its
baseline share one process or alternate one model per process."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgeprune.devices.base import Device, DeviceError
from edgeprune.errors import EdgepruneError
from edgeprune.measure import BenchmarkRecord, Workload
from edgeprune.runtimes.base import Runner

# Room both models of a side-by-side benchmark need beyond their files: KV caches, compute buffers.
TOGETHER_FACTOR = 1.1
TOGETHER_SLACK = 512 << 20


def request(workload: Workload, model: str, baseline: str | None, pin: bool) -> bytes:
    return json.dumps(workload.to_dict() | {"model": model, "baseline": baseline, "pin": pin}).encode()


def record(device: Device, model: Path, stdout: bytes, runner: str) -> BenchmarkRecord:
    """The record a worker printed for `model`, timed by `runner` (`Runner.name`)."""
    try:
        raw = json.loads(stdout)
        return BenchmarkRecord(device=device.url, emulated=device.emulated, runner=runner, **raw)
    except (ValueError, TypeError) as e:
        raise DeviceError(f"The benchmark of {model.name} on {device.url} printed no usable record ({e}).") from None


class WorkerRunner(Runner):
    """Each benchmark in a fresh worker process; the candidate alternates with its baseline in one
    process when both fit in the device's memory (and no RAM cap judges the candidate alone),
    else one model per process."""

    module: ClassVar[str]  # run as `python -m module`

    def __init__(self, device: Device, ram_cap: int | None = None) -> None:
        super().__init__(device)
        if device.python is None:
            raise DeviceError(f"{device.url} has no Python to run {self.module} with.")
        self.ram_cap = ram_cap

    def benchmark(self, model: Path, workload: Workload, baseline: Path | None = None) -> BenchmarkRecord:
        if baseline is None or self._together(model, baseline):
            return self.side_by_side(model, workload, baseline)
        return self.alternate(model, workload, baseline)

    def side_by_side(self, model: Path, workload: Workload, baseline: Path | None) -> BenchmarkRecord:
        """Both models in one worker process, timed in alternation."""
        return self._run(model, workload, baseline, self.ram_cap)

    def alternate(self, model: Path, workload: Workload, baseline: Path) -> BenchmarkRecord:
        """One model per process, alternating: each run loads (and warms up) its model afresh."""
        once = replace(workload, repetitions=1)
        alone = replace(once, settings=workload.baseline_settings)  # the baseline's process, with its settings
        mine, theirs = [], []
        for _ in range(workload.repetitions):
            mine.append(self._run(model, once, None, self.ram_cap))
            if mine[-1].ram_cap_exceeded:
                return mine[-1]
            theirs.append(self._run(baseline, alone, None, None))  # the cap judges the candidate alone
        return alternated(mine, theirs)

    def _together(self, model: Path, baseline: Path) -> bool:
        """Whether one process may hold both models for side-by-side runs: not under a RAM cap (it
        judges the candidate alone), and only when both stay resident with room to spare (an 8B
        Q4_K_M and its baseline make 9 GB: more than a 16 GB laptop leaves a build). A device that
        cannot say how much memory it has left holds both."""
        if self.ram_cap is not None:
            return False
        headroom = self.device.memory_headroom()
        both = model.stat().st_size + baseline.stat().st_size
        return headroom is None or both * TOGETHER_FACTOR + TOGETHER_SLACK <= headroom

    def _run(self, model: Path, workload: Workload, baseline: Path | None, cap: int | None) -> BenchmarkRecord:
        device = self.device
        req = request(workload, device.stage(model), device.stage(baseline) if baseline else None, device.config.pin)
        run = device.run_worker(["-m", self.module], req, f"the benchmark of {model.name}", cap)
        if run.ram_cap_exceeded:
            # An overrun is a verdict on the candidate, not a failure of edgeprune.
            return BenchmarkRecord(device=device.url, runs=[], peak_rss_bytes=run.peak_rss_bytes, load_s=0.0,
                                   threads=workload.threads, runtime="", system_info="", cpu=device.cpu,
                                   ram_cap_exceeded=True)
        if run.returncode < 0:
            raise self.crashed(run.returncode, model)
        if run.returncode != 0:
            tail = (run.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise DeviceError(f"The benchmark of {model.name} failed on {device.url}: {tail}")
        return record(device, model, run.stdout, self.name)


    def crashed(self, returncode: int, model: Path) -> EdgepruneError:
        """The error for a worker that a signal ended while it timed `model`."""
        return DeviceError(f"The benchmark worker {self.module} was killed (signal {-returncode}) while timing "
                           f"{model.name} on {self.device.url}.")


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
