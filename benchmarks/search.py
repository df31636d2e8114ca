"""The search itself, measured: how many device benchmarks and candidates each budget costs, how
long it takes, and what it picks, on the embedded model with the `demo` target (this machine).

For each strategy and speed-up budget, `edgeprune build --target demo --speedup X` runs through
the CLI, as a user runs it, and its report.json is read back:

- search benchmarks: the benchmarks the search ran on the device — the baseline, each candidate
  timed (alongside the unpruned model), each confirmation of a pick; and, apart, the trials of
  the runtime settings timed on the pick once the search is over;
- candidates built (GGUF written and its quality measured), and how many were timed;
- wall time of the build, and the part of it spent timing candidates;
- the pick's measured speed-up and held-out KLD, or the stop reason when no candidate met it.

Each strategy has its own cache (under --cache-dir), shared by its builds: the reference,
calibration and any candidate an earlier budget built are reused, so its first budget pays for the
common work and later wall times are lower than on an empty cache. The budgets run in turn, both
strategies at each, so the machine's drift hits them alike. The speed-ups are ratios of runs taken
side by side on this shared machine; a rerun moves them by a few percent and can change a pick near
its budget.

    .venv/bin/python benchmarks/search.py [--budgets 1.2,1.43,1.75,2.0] [--strategies greedy,pareto]
        [--profile default] [--out benchmarks/results/search.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def search_benchmarks(report: dict) -> int:
    """Benchmark runs the search made on the device (see the module's docstring)."""
    candidates = report["search"]["candidates"]
    return sum(c["measured"] for c in candidates) + sum(bool(c["confirmed"]) for c in candidates)


def summarise(report: dict, wall_s: float, exit_code: int) -> dict:
    search = report["search"]
    candidates = search["candidates"]
    by_id = {c["id"]: c for c in candidates}
    pick = by_id.get(search["selected"]) if search["selected"] else None
    closest = by_id[search["closest"]]
    return {
        "exit_code": exit_code,
        "search_benchmarks": search_benchmarks(report),
        "settings_trials": len(report.get("runtime_settings", {}).get("trials", [])),
        "built": len(candidates),
        "timed": sum(c["measured"] for c in candidates),
        "not_built": len(search["not_built"]),
        "wall_s": wall_s,
        "benchmark_s": report["timings_s"].get("benchmark"),  # candidates timed and confirmed
        "timings_s": report["timings_s"],
        "budget_met": search["budget_met"],
        "pick": pick and {"id": pick["id"], "step": pick["step"], "speedup": pick["speedup"],
                          "mean_kld": pick["mean_kld"], "top1": pick["top1_agreement"]},
        "reachable_speedup": search.get("reachable_speedup"),
        "strategy_details": search.get("strategy_details"),
        "closest": {"id": closest["id"], "step": closest["step"], "speedup": closest["speedup"]},
        "stop_reason": search["stop_reason"],
        "under_prediction": report.get("latency_model", {}).get("under_prediction"),
    }


def run_build(strategy: str, budget: float, profile: str, cache_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "edgeprune", "build", "--target", "demo", "--speedup", f"{budget:g}",
               "--profile", profile, "-o", str(out), "--cache-dir", str(cache_dir), "-q"]
        cmd += ["--strategy", strategy]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if not (out / "report.json").exists():
            raise SystemExit(f"build at {budget:g}x ({strategy}) wrote no report: {proc.stderr.strip()[-2000:]}")
        return summarise(json.loads((out / "report.json").read_text()), wall, proc.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="1.2,1.43,1.75,2.0")
    parser.add_argument("--strategies", default="greedy,pareto")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "benchmarks" / "search")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "search.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    results: dict = {"profile": args.profile, "target": "demo", "model": "embedded SmolLM2-135M", "runs": []}
    print(f"{'strategy':9s} {'budget':>6s} {'benchmarks':>10s} {'built':>5s} {'timed':>5s} {'wall min':>8s} "
          f"{'bench min':>9s} "
          f"{'pick':>5s} {'speed-up':>8s} {'KLD':>6s}  step / stop reason", flush=True)
    for budget in (float(b) for b in args.budgets.split(",")):
        for strategy in args.strategies.split(","):  # side by side: the machine's drift hits both alike
            row = {"strategy": strategy, "budget": budget,
                   **run_build(strategy, budget, args.profile, args.cache_dir / strategy)}
            results["runs"].append(row)
            pick = row["pick"]
            shown = (f"{pick['id']:>5s} {pick['speedup']:7.2f}x {pick['mean_kld']:6.3f}  {pick['step']}" if pick else
                     f"{'none':>5s} {row['closest']['speedup']:7.2f}x {'':6s}  closest {row['closest']['id']}; "
                     f"{row['stop_reason']}")
            print(f"{strategy:9s} {budget:5.2f}x {row['search_benchmarks']:10d} {row['built']:5d} {row['timed']:5d} "
                  f"{row['wall_s'] / 60:8.1f} {(row['benchmark_s'] or 0) / 60:9.1f} {shown}", flush=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
