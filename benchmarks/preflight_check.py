"""The memory preflight's estimate against a measured `edgeprune prune --plan` on the embedded model.

    .venv/bin/python benchmarks/preflight_check.py PLAN.toml [--profile default] [--run]

Prints the estimate (peak phase, every phase, disk); with --run, runs `edgeprune prune --plan` in a
fresh cache and samples its process tree every 0.1 s: peak RSS and peak anonymous memory (RssAnon
+ RssShmem, what a memory cgroup cannot reclaim), summed over the parent and its llama.cpp children.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeprune.config import load_profile
from edgeprune.footprint import Work, estimate
from edgeprune.limits import fmt, machine_limits
from edgeprune.models.embedded import embedded_gguf
from edgeprune.models.weights import GGUFStore
from edgeprune.preflight import summary
from edgeprune.prune.spec import load_plan_spec


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous) in bytes."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0) + fields.get("RssShmem", 0)


def measure(command: list[str]) -> tuple[int, int, float, int]:
    """(peak RSS, peak anonymous memory, wall seconds, exit code) of a command's process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        rss = anon = 0
        for pid in _tree(proc.pid):
            r, a = _memory(pid)
            rss, anon = rss + r, anon + a
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.1)
    return peak_rss, peak_anon, time.perf_counter() - t0, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--run", action="store_true", help="run edgeprune prune --plan and measure it")
    args = parser.parse_args()

    from transformers import AutoConfig

    path = embedded_gguf()
    store = GGUFStore(path, AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    profile = load_profile(args.profile)
    spec = load_plan_spec(args.plan)
    slices = any(s.heads is not None or s.ffn is not None for s in [spec.all, *spec.layers.values()])
    work = Work.for_prune(quant="Q4_K_M", imatrix=True, self_generated=True, slices=slices,
                          plan_search=profile.search if spec.needs_importance() else None, hf_checkpoint=True)
    est = estimate(store, profile.calibration, work)
    with tempfile.TemporaryDirectory() as tmp:
        print(summary(est, machine_limits(Path(tmp) / "cache", Path(tmp) / "out")))
        for phase in est.phases:
            parts = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(phase.ram.items(), key=lambda kv: -kv[1]) if v)
            print(f"  {fmt(phase.total):>10}  {phase.name}: {parts}")
        print("  disk:", ", ".join(f"{k} {fmt(v)}" for k, v in {**est.cache_disk, **est.output_disk}.items()))
        if not args.run:
            return
        command = [sys.executable, "-m", "edgeprune", "prune", "--plan", str(args.plan), "-p", args.profile,
                   "-o", f"{tmp}/out", "--cache-dir", f"{tmp}/cache"]
        rss, anon, wall, code = measure(command)
        print(f"measured (exit {code}, {wall:.0f} s): peak RSS {fmt(rss)}, peak anonymous {fmt(anon)}; "
              f"estimated peak {fmt(est.peak_ram)} ({est.peak.name}); measured RSS / estimate {rss / est.peak_ram:.2f}")


if __name__ == "__main__":
    main()
