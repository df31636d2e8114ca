"""The Python runner (edgeprune.runtimes.bench_worker) as a device runs it: request and record."""

from __future__ import annotations

import json
from pathlib import Path

from edgeprune.devices.base import Device, DeviceError
from edgeprune.measure import BenchmarkRecord, Workload

WORKER = ["-m", "edgeprune.runtimes.bench_worker"]


def request(workload: Workload, model: str, baseline: str | None, pin: bool) -> bytes:
    return json.dumps(workload.to_dict() | {"model": model, "baseline": baseline, "pin": pin}).encode()


def record(device: Device, model: Path, stdout: bytes) -> BenchmarkRecord:
    try:
        raw = json.loads(stdout)
        return BenchmarkRecord(device=device.url, emulated=device.emulated, **raw)
    except (ValueError, TypeError) as e:
        raise DeviceError(f"The benchmark of {model.name} on {device.url} printed no usable record ({e}).") from None
