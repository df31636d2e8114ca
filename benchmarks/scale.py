"""Memory and time at real model sizes: random-weight Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B shapes.

For each model: writes the checkpoint (bf16 safetensors sharded as the hub ships it; reused if
present), then runs `edgeprune prune --plan` with the case study's seed recipe (middle 25% of
layers, one query head per KV group) and `edgeprune build --profile quick --target demo` with a
speed-up budget that needs pruning, each in a fresh process inside a memory cgroup (default 8 GiB)
with a fresh cache (sharing the default cache's compiled llama.cpp binaries). Records the peak
anonymous memory (RssAnon + RssShmem) and peak RSS of the whole process tree, the cgroup's own
peak charge, whether the kernel OOM-killed it, wall time (and per stage where the command records
it), and the cache's disk use. Prints a table with per-billion-parameter
figures and a 70B extrapolation (least-squares line through the models measured), and writes JSON.

Random weights make every quality figure (KLD, perplexity, agreement) meaningless: this measures
memory and time only.

    .venv/bin/python benchmarks/scale.py [--models llama-3.2-1b,llama-3.2-3b,llama-3.1-8b] [--skip-build]
        [--limit-gib 8] [--dir DIR] [--cache-dir DIR] [--out benchmarks/results/scale.json] [--append]
        [--target demo] [--strategy greedy|pareto]

The JSON is rewritten after every command, so an interrupted run keeps what it measured; with --append,
rows of an earlier run in --out are kept and this run's commands replace theirs, model by model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgeprune.cgroup import CgroupUnavailable, run_limited  # noqa: E402
from edgeprune.memory import evict_page_cache  # noqa: E402
from edgeprune.models.synthetic import NOTE, PRESETS, seed_plan, write_checkpoint  # noqa: E402

GIB = 1 << 30
LLAMA_70B_PARAMETERS = 70.55e9  # Llama-3.1-70B
DEFAULT_MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")


def default_cache_root() -> Path:
    root = os.environ.get("EDGEPRUNE_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeprune"


def disk_use(path: Path) -> int:
    """Bytes allocated on disk under `path` (du: sparse files count what they use)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class DiskPeak:
    """The most `path` held at once, polled every few seconds in a thread (a build removes files
    as it goes: its cache at the end is not its peak)."""

    def __init__(self, path: Path, period_s: float = 5.0) -> None:
        self.path, self.period_s, self.peak = path, period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, disk_use(self.path))

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_use(self.path))


def stage_timeline(cache: Path, since: float) -> list[dict[str, Any]]:
    """Cache stages this run built, in order, with when each finished (seconds after the start) and the
    time since the previous one finished: the stage's own time where stages run one after another."""
    done = []
    for result in (cache / "stages").glob("*/*/result.json"):
        finished = result.stat().st_mtime - since
        if finished >= 0:
            done.append((finished, result.parent.parent.name))
    done.sort()
    out, previous = [], 0.0
    for finished, name in done:
        out.append({"stage": name, "finished_s": round(finished, 1), "since_previous_s": round(finished - previous, 1)})
        previous = finished
    return out


def search_summary(search: dict[str, Any]) -> dict[str, Any]:
    """What a build's search chose, and each candidate's structure, KLD, speed-up and verdict."""
    cands = search.get("candidates", [])
    pick = next((c for c in cands if c["selected"]), None)
    return {k: search.get(k) for k in ("selected", "stop_reason", "candidate_files")} | {
        "candidates": len(cands),
        "selected_step": pick["step"] if pick else None,
        "selected_speedup": pick["speedup"] if pick else None,
        "trail": [{k: c.get(k) for k in ("id", "step", "mean_kld", "speedup", "peak_rss_bytes", "verdict")}
                  for c in cands],
    }


def run_command(name: str, argv: list[str], model_dir: Path, work: Path, limit: int | None,
                keep_cache: bool, resume: bool = False) -> dict[str, Any]:
    """One edgeprune command in a fresh process, cache and output directory, under the memory limit.

    With `resume`, the cache an interrupted run left is reused: its finished stages are not redone,
    so the wall time and stage timeline cover only what was left (the record says so)."""
    cache, out, log = work / f"{name}-cache", work / f"{name}-out", work / f"{name}.log"
    if not resume:
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    toolchains = default_cache_root() / "toolchain"
    if name == "build" and toolchains.is_dir() and not (cache / "toolchain").exists():
        # The bundle's llama.cpp binaries are compiled once per machine (~10 min), not per model:
        # a fresh cache shares them, and its disk use leaves them out.
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "toolchain").symlink_to(toolchains.resolve(), target_is_directory=True)
    cmd = [sys.executable, "-m", "edgeprune", *argv, "-o", str(out), "--cache-dir", str(cache), "--force"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"  {name}: {' '.join(cmd[2:])}", flush=True)
    evict_page_cache(model_dir)  # every run starts cold, as after a download
    started, load_before = time.time(), os.getloadavg()[0]
    with open(log, "a" if resume else "w") as f, DiskPeak(cache) as disk:
        run = run_limited(cmd, limit, period_s=0.2, stdout=f, stderr=f, env=env)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    record = run.to_dict() | {
        "command": name,
        "argv": cmd[1:],
        "resumed": resume,
        "ok": run.returncode == 0 and not run.oom_killed,
        "timings_s": report.get("timings_s"),
        "memory": report.get("memory"),  # the preflight's estimate beside the command's own measured peaks
        "stages": stage_timeline(cache, started),
        "cache_disk_bytes": disk_use(cache),
        "cache_disk_peak_bytes": disk.peak,
        "search": search_summary(report.get("search", {})),
        "output_disk_bytes": disk_use(out),
        "log": str(log),
        # Wall times are only comparable on an otherwise idle machine: the 1-minute load around the run.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if not record["ok"]:
        tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-5:]
        record["log_tail"] = tail
        print("    " + "\n    ".join(tail), flush=True)
    if not keep_cache:  # the next model's run needs the disk (an 8B run writes ~30 GiB)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return record


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope; through the origin with a single point."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def extrapolate(rows: list[dict[str, Any]], command: str, key: str) -> float | None:
    points = [(r["parameters"], r[command][key]) for r in rows if r.get(command, {}).get("ok")]
    if not points:
        return None
    a, b = fit_line([p for p, _ in points], [v for _, v in points])
    return a + b * LLAMA_70B_PARAMETERS if b > 0 else None  # a falling line: noise, nothing to extrapolate


def _status(run: dict[str, Any]) -> str:
    if run["oom_killed"]:
        return "OOM-killed"
    if run["timed_out"]:
        return "timed out"
    return "ok" if run["returncode"] == 0 else f"exit {run['returncode']}"


def print_table(results: dict[str, Any]) -> None:
    limit = results["limit_bytes"]
    print(f"\nMemory limit: {limit / GIB:g} GiB (memory cgroup)" if limit else "\nNo memory limit")
    print(f"NOTE: {NOTE}.")
    head = (f"{'model':<16}{'params':>8} {'command':<8}{'status':<11}{'wall':>8}{'anon GiB':>9}{'RSS GiB':>8}"
            f"{'cg GiB':>7}{'anon/B':>7}{'s/B':>7}{'cache GiB':>10}{'peak':>6}")
    print(head + "\n" + "-" * len(head))
    for row in results["models"]:
        billions = row["parameters"] / 1e9
        for command in ("prune", "build"):
            run = row.get(command)
            if run is None:
                continue
            cg = f"{run['max_usage_bytes'] / GIB:.2f}" if run["max_usage_bytes"] else "-"
            print(f"{row['model']:<16}{billions:>7.2f}B {command:<8}{_status(run):<11}{run['wall_s']:>7.0f}s"
                  f"{run['peak_anon_bytes'] / GIB:>9.2f}{run['peak_rss_bytes'] / GIB:>8.2f}"
                  f"{cg:>7}{run['peak_anon_bytes'] / GIB / billions:>7.2f}"
                  f"{run['wall_s'] / billions:>7.0f}{run['cache_disk_bytes'] / GIB:>10.2f}"
                  f"{run.get('cache_disk_peak_bytes', 0) / GIB:>6.1f}")
    for row in results["models"]:
        search = (row.get("build") or {}).get("search")
        if search:
            argv = row["build"]["argv"]
            strategy = argv[argv.index("--strategy") + 1] if "--strategy" in argv else "the profile's"
            print(f"{row['model']} build ({strategy} strategy, {search['candidates']} candidates): "
                  f"{search.get('selected_step') or search['selected'] or 'nothing selected'}"
                  + (f", {search['selected_speedup']:.2f}x" if search.get("selected_speedup") else "")
                  + f"; {search['stop_reason']}")
    for command, fit in results["extrapolation_70b"].items():
        if fit["points"]:
            figures = [f"{label} {fit[key] / scale:.1f} {unit}" if fit[key] is not None else f"{label}: no rising fit"
                       for label, key, scale, unit in (("peak anonymous", "peak_anon_bytes", GIB, "GiB"),
                                                       ("peak RSS", "peak_rss_bytes", GIB, "GiB"),
                                                       ("wall", "wall_s", 60, "min"))]
            print(f"70B extrapolation ({command}, line through {fit['points']} model(s)): {', '.join(figures)}")
    print("anon = RssAnon+RssShmem over the process tree (what a memory limit bounds); RSS also counts the page "
          "cache of memory-mapped files; cg = the cgroup's peak charge (anonymous + page cache); cache GiB: at the "
          "end, peak: the most at once. s/B, anon/B: per "
          "billion parameters.")


def save(results: dict[str, Any], out: Path) -> None:
    """Write the results with the 70B extrapolation refitted, atomically: a killed run keeps the last table."""
    results["models"].sort(key=lambda r: r.get("parameters", 0))
    results["extrapolation_70b"] = {
        command: {"points": sum(1 for r in results["models"] if r.get(command, {}).get("ok")),
                  **{key: extrapolate(results["models"], command, key)
                     for key in ("peak_anon_bytes", "peak_rss_bytes", "wall_s")}}
        for command in ("prune", "build")
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated presets: {', '.join(PRESETS)}")
    parser.add_argument("--skip-build", action="store_true", help="only `prune --plan`")
    parser.add_argument("--skip-prune", action="store_true", help="only `build`")
    parser.add_argument("--limit-gib", type=float, default=8.0, help="memory cgroup limit; 0: no cgroup, no limit")
    parser.add_argument("--dir", type=Path, default=default_cache_root() / "synthetic",
                        help="where the checkpoints are written (and reused)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_root() / "scale-runs",
                        help="each run's fresh cache, output and log (cache and output removed after measuring)")
    parser.add_argument("--keep-caches", action="store_true", help="keep each run's cache and output")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the caches an interrupted run left (the record's times then cover only the rest)")
    parser.add_argument("--prune-profile", default="default", help="profile of `prune` (its calibration)")
    parser.add_argument("--calib", type=Path, default=None,
                        help="calibration text for both commands (default: self-generated by the model, as users get)")
    parser.add_argument("--speedup", type=float, default=1.3,
                        help="`build --speedup`: a budget over the unpruned Q4_K_M that requantizing alone misses")
    parser.add_argument("--target", default="demo",
                        help="`build --target` (a name or a .toml; demo's RAM ceiling is 4 GiB, under an 8B's Q4_K_M)")
    parser.add_argument("--strategy", choices=("greedy", "pareto"), default=None,
                        help="`build --strategy` (default: the quick profile's, greedy)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the models and commands already in --out; this run's replace theirs")
    args = parser.parse_args()

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in PRESETS]
    if unknown:
        parser.error(f"unknown models {unknown}; presets: {', '.join(PRESETS)}")
    limit = int(args.limit_gib * GIB) if args.limit_gib > 0 else None
    results: dict[str, Any] = {"limit_bytes": limit, "note": NOTE, "cpu_count": os.cpu_count(),
                               "calib": str(args.calib) if args.calib else "self-generated", "models": []}
    if args.append and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if earlier.get("limit_bytes") != limit or earlier.get("calib") != results["calib"]:
            sys.exit(f"error: {args.out} was measured with another --limit-gib or --calib; "
                     "append only to a run with the same settings, or write to another --out.")
        results["models"] = earlier["models"]
    for name in names:
        preset = PRESETS[name]
        print(f"{name}: {preset.parameters() / 1e9:.2f}B parameters, {preset.bf16_bytes() / 1e9:.2f} GB bf16",
              flush=True)
        t0 = time.perf_counter()
        model_dir = write_checkpoint(preset, args.dir / name)
        written = time.perf_counter() - t0
        plan = args.dir / f"{name}-seed-plan.json"
        plan.write_text(json.dumps(seed_plan(preset.layers, preset.heads, preset.kv_heads)))
        work = args.cache_dir / name
        work.mkdir(parents=True, exist_ok=True)
        row = next((r for r in results["models"] if r["model"] == name), None)
        if row is None:
            row = {"model": name}
            results["models"].append(row)
        row.update({"parameters": preset.parameters(), "bf16_bytes": preset.bf16_bytes(),
                    "checkpoint": str(model_dir), "checkpoint_write_s": round(written, 1),
                    "plan": json.loads(plan.read_text())})
        calib = ["--calib", str(args.calib.resolve())] if args.calib else []
        strategy = ["--strategy", args.strategy] if args.strategy else []
        try:
            if not args.skip_prune:
                row["prune"] = run_command("prune", ["prune", "--model", str(model_dir), "--plan", str(plan),
                                                     "-p", args.prune_profile, *calib],
                                           model_dir, work, limit, args.keep_caches, args.resume)
                save(results, args.out)
            if not args.skip_build:
                build = ["build", "--model", str(model_dir), "--profile", "quick", "--target", args.target,
                         "--speedup", str(args.speedup), *strategy, *calib]
                row["build"] = run_command("build", build, model_dir, work, limit, args.keep_caches, args.resume)
                save(results, args.out)
        except CgroupUnavailable as e:
            sys.exit(f"error: {e} Run with --limit-gib 0 to measure without a limit.")
    save(results, args.out)
    print_table(results)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
