"""Recovery fine-tuning on the embedded model: how much of the pruning's quality loss comes back.

Two plans, as the pareto search picks them at the demo's budgets (README, "The search"): ~1.5x
(the 4 layers Block Influence ranks least important) and ~1.8x (7 layers and 4 more attention
sublayers). For each configuration `edgeprune recover` runs in its own process with the default
profile (self-generated calibration, 8 held-out windows of 128 tokens never trained on, Q4_K_M
with an imatrix from the recovered model) and a recovery time budget; the table shows held-out
KLD / perplexity / top-1 before and after, the share of the lost KLD recovered, wall and CPU
minutes, steps and tokens. KD vs SFT and LoRA vs full at ~1.8x; KD LoRA at ~1.5x. `recover`'s chat
check (three fixed questions, greedy, in the chat template) before and after recovery is printed
with each answer's verdict (edgeprune/chat_health.py). Writes benchmarks/results/recovery.json.

    .venv/bin/python benchmarks/recovery.py [--minutes 30] [--configs kd-lora-1.8,kd-full-1.8,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeprune.config import load_profile  # noqa: E402
from edgeprune.models import load_reference, resolve_source  # noqa: E402
from edgeprune.pipeline import calibration_splits, importance_of  # noqa: E402
from edgeprune.stages import StageRunner  # noqa: E402

CONFIGS = {  # name -> (plan, method, objective)
    "kd-lora-1.8": ("1.8x", "lora", "kd"),
    "kd-full-1.8": ("1.8x", "full", "kd"),
    "sft-lora-1.8": ("1.8x", "lora", "sft"),
    "kd-lora-1.5": ("1.5x", "lora", "kd"),
}
def plans(cache: Path) -> dict[str, dict]:
    """The two plans as plan files (original layer indices), from the build's own importance ranking."""
    profile = load_profile("default")
    reference = load_reference(resolve_source(None), cache)
    runner = StageRunner(cache / "stages")
    splits = calibration_splits(reference, profile.calibration, None, runner)
    importance = importance_of(reference, splits, profile.search, runner)
    n = len(importance.layer_scores)
    layers = importance.layers_by_importance(protect=(0, n - 1))
    deep = sorted(layers[:7])
    attention = [i for i in importance.attention_by_importance(protect=(0,)) if i not in deep][:4]
    return {"1.5x": {"drop_layers": sorted(layers[:4])},
            "1.8x": {"drop_layers": deep, "layers": {str(i): {"attention": False} for i in sorted(attention)}}}


def profile_file(work: Path, method: str, objective: str) -> Path:
    text = (ROOT / "profiles" / "default.toml").read_text()
    path = work / f"profile-{method}-{objective}.toml"
    path.write_text(text + f'\n[recovery]\nmethod = "{method}"\nobjective = "{objective}"\n')
    return path


def run(name: str, plan_file: Path, work: Path, minutes: float, cache: Path) -> dict:
    plan, method, objective = CONFIGS[name]
    out = work / name
    cmd = [sys.executable, "-m", "edgeprune", "recover", "--plan", str(plan_file), "-o", str(out), "--force",
           "-p", str(profile_file(work, method, objective)), "--recover-minutes", str(minutes), "--cache-dir",
           str(cache), "-q"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr}")
    report = json.loads((out / "report.json").read_text())
    rec, q = report["recovery"], report["quality"]
    return {"config": name, "plan": plan, "plan_description": report["plan"], "method": method,
            "objective": objective, "minutes_budget": minutes,
            "before": rec["before"], "after": q, "recovered_share": rec["recovered_share"],
            "train_minutes": rec["seconds"] / 60, "steps": rec["steps"], "tokens": rec["tokens"],
            "process_wall_minutes": wall / 60,
            "process_cpu_minutes": (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60,
            "chat": rec["chat"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="recovery time budget per configuration")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeprune-recovery-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery.json")
    args = ap.parse_args()
    cache = Path(os.environ.setdefault("EDGEPRUNE_CACHE", str(args.work / "cache")))
    args.work.mkdir(parents=True, exist_ok=True)
    files = {}
    for label, spec in plans(cache).items():
        files[label] = args.work / f"plan-{label}.json"
        files[label].write_text(json.dumps(spec))
    rows = []
    for name in args.configs.split(","):
        print(f"{name}: recovering for {args.minutes:g} min ...", flush=True)
        rows.append(run(name, files[CONFIGS[name][0]], args.work, args.minutes, cache))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"minutes": args.minutes, "rows": rows}, indent=1))
    print("\n| config | plan | KLD before | KLD after | recovered | PPL before/after | top-1 before/after | "
          "train min | CPU min | steps | tokens |")
    print("|---" * 11 + "|")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"| {r['config']} | {r['plan_description'].split(';')[0]} | {b['mean_kld']:.3f} | {a['mean_kld']:.3f} | "
              f"{r['recovered_share'] * 100:.0f}% | {b['perplexity']:.2f} / {a['perplexity']:.2f} | "
              f"{b['top1_agreement'] * 100:.1f}% / {a['top1_agreement'] * 100:.1f}% | {r['train_minutes']:.1f} | "
              f"{r['process_cpu_minutes']:.1f} | {r['steps']} | {r['tokens']:,} |")
    for r in rows:
        print(f"\n{r['config']} chat answers (distinct-word share; why degenerate), before -> after recovery:")
        for before, after in zip(r["chat"]["before"], r["chat"]["after"], strict=True):
            print(f"  Q: {before['question']}")
            for when, a in (("before", before), ("after", after)):
                print(f"  {when} ({a['distinct_share']:.2f}{'; ' + a['degenerate'] if a['degenerate'] else ''}): "
                      f"{a['answer'][:200]!r}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
