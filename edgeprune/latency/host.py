"""The two figures of this machine a roofline needs, measured once and cached.

- Memory bandwidth: a streaming read of an array far larger than the last-level cache, by as many
  threads as llama.cpp will use, each summing its own slice (numpy releases the GIL inside the
  reduction). It is the rate at which `threads` cores can pull data they do not reuse from DRAM,
  which is what decoding does with the weights. The best of a few passes: on a shared machine
  other jobs only ever make a pass slower.
- Matrix multiply throughput: float32 GEMM in torch with `threads` threads, best of a few. It is
  the order of magnitude of what prefill's matrix multiplies reach, not llama.cpp's own (quantized)
  kernels: the latency model's prefill efficiency takes up the difference.

Both together take about a second; the result is cached under `<cache_dir>/host/`, keyed by the CPU
model and the thread count. Measured while other jobs load the memory bus, the bandwidth reads low
(22 instead of 28-30 GB/s for one thread here); delete the file to measure again. Predictions on
this machine do not depend on it (the fitted efficiency is relative to it); transferred estimates
do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeprune.cpu import cpu_model

log = logging.getLogger(__name__)

VERSION = 1  # bump when what is measured changes, so cached profiles are re-measured
STREAM_BYTES = 256 << 20  # 8x the 32 MiB L3 of this EPYC host; larger than the LLC of edge CPUs
STREAM_PASSES = 5
GEMM_N = 1024  # 2.1 GFLOP per product: long enough for a stable rate, short enough for slow devices
GEMM_PASSES = 5


@dataclass(frozen=True)
class HostProfile:
    bandwidth_gbs: float  # streaming read with `threads` threads, GB/s (1e9 bytes)
    matmul_gflops: float  # float32 GEMM with `threads` threads, GFLOP/s
    threads: int
    cpu: str

    def describe(self) -> str:
        return (f"{self.cpu or 'unknown CPU'}, {self.threads} thread(s): {self.bandwidth_gbs:.1f} GB/s streaming read, "
                f"{self.matmul_gflops:.0f} GFLOP/s fp32 matmul")


def measure_bandwidth(threads: int, nbytes: int = STREAM_BYTES, passes: int = STREAM_PASSES) -> float:
    """Streaming-read bandwidth in GB/s: `threads` threads each summing a disjoint slice."""
    data = np.ones(nbytes // 8, dtype=np.float64)  # written once, so every page is resident before timing
    slices = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            t0 = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best / 1e9


def measure_matmul(threads: int, n: int = GEMM_N, passes: int = GEMM_PASSES) -> float:
    """float32 matrix-multiply throughput in GFLOP/s with `threads` torch threads (restored after)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        torch.mm(a, b)  # warm-up: thread pool start, page faults
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 / best / 1e9


def measure_host(threads: int) -> HostProfile:
    if threads < 1:
        raise ValueError("threads must be at least 1")
    t0 = time.perf_counter()
    profile = HostProfile(measure_bandwidth(threads), measure_matmul(threads), threads, cpu_model())
    log.info("host profile measured in %.1f s: %s", time.perf_counter() - t0, profile.describe())
    return profile


def host_profile(cache_dir: Path, threads: int) -> HostProfile:
    """This machine's profile for `threads` threads: from the cache, or measured once and cached."""
    cpu = cpu_model()
    path = Path(cache_dir) / "host" / f"{_slug(cpu)}-t{threads}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.pop("version", None) == VERSION:
            return HostProfile(**cached)
    except (OSError, ValueError, TypeError):
        pass  # absent, unreadable or from another version: measure again
    profile = measure_host(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent builds: each its own
    tmp.write_text(json.dumps(asdict(profile) | {"version": VERSION}, indent=1))
    tmp.replace(path)
    return profile


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "unknown-cpu"
