"""Benchmark process: time a model file with its runtime's engine (`engines.py`), print one JSON record.

Runs as its own process (`python -m edgeprune.runtimes.bench_worker < request.json`), here or on
a device with edgeprune installed, so that its peak RSS is the runtime's alone, not torch's, and a
crash cannot take the build down.

With a `baseline` model in the request, the two are timed in alternation (candidate, baseline,
candidate, ...) in the same process, so a speed-up is a ratio of runs taken side by side: on a
shared machine, speed drifts by 10-20% within seconds, far more than within one alternation.
The candidate's peak RSS is read before the baseline is loaded. `pin` pins the process (and so
every runtime thread) to as many cores as it has threads before anything is loaded. The two files
may be of different runtimes; the record names the candidate's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from edgeprune.cpu import cpu_model
from edgeprune.memory import peak_rss_bytes
from edgeprune.runtimes.engines import engine_module


def main() -> None:
    request = json.load(sys.stdin)
    prompt, answer, threads = request["prompt"], request["answer_tokens"], request["threads"]
    if request.get("pin"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    n_ctx = len(prompt) + answer + 8

    model = Path(request["model"])
    runtime = engine_module(model)
    t0 = time.perf_counter()
    engine = runtime.load(model, n_ctx, threads, request.get("settings") or {})
    load_s = time.perf_counter() - t0
    tokens: list[int] = []
    for i in range(request["warmup"]):
        engine.timed_generation(prompt, answer, tokens if i == 0 else None)
    peak_rss = peak_rss_bytes()

    baseline = None
    if request.get("baseline"):
        path = Path(request["baseline"])
        baseline = engine_module(path).load(path, n_ctx, threads, request.get("baseline_settings") or {})
        for _ in range(request["warmup"]):
            baseline.timed_generation(prompt, answer)

    runs, baseline_runs = [], []
    for _ in range(request["repetitions"]):
        runs.append(engine.timed_generation(prompt, answer, None if tokens else tokens))
        if baseline is not None:
            baseline_runs.append(baseline.timed_generation(prompt, answer))
    engine.close()
    if baseline is not None:
        baseline.close()
    json.dump(
        {
            "runs": runs,
            "baseline_runs": baseline_runs,
            "load_s": load_s,
            "peak_rss_bytes": peak_rss,
            "threads": (request.get("settings") or {}).get("threads", threads),
            "runtime": runtime.version(),
            "system_info": runtime.system_info(),
            "cpu": cpu_model(),
            "cpus": sorted(os.sched_getaffinity(0)) if request.get("pin") else None,
            "tokens": tokens,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
