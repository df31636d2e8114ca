"""llama.cpp's runtime settings on this machine: every combination the build's tuning step can
reach, timed against the defaults, and what the tuning step itself picks.

For each model (the embedded SmolLM2-135M and a random-weight Llama-3.2-1B, both Q4_K_M without
an importance matrix: speed does not depend on which codes the quantizer picks), each combination
of `runtimes/llamacpp/settings.space` is timed in the benchmark worker alternated with the same
file at the defaults, on an SLO-shaped request (64 prompt tokens, or `--prompt-tokens`; 100
answer tokens): medians of the paired latency ratios, so a shared machine's drift cancels.
Decode speed is set against the bandwidth roofline: weight bytes read per token (the latency
model's `ModelTraffic`; a long prompt's KV cache reads come on top) over this machine's
streaming-read bandwidth with all cores (measured here). Then `search.tuning.tune` runs as a
build runs it, and its pick is timed against the defaults once more.

    .venv/bin/python benchmarks/settings.py [--models embedded,llama-3.2-1b] [--repetitions 7]
        [--prompt-tokens 64,1024] [--out benchmarks/results/settings.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgeprune.devices import get_device  # noqa: E402
from edgeprune.latency.host import measure_bandwidth  # noqa: E402
from edgeprune.latency.traffic import ModelTraffic  # noqa: E402
from edgeprune.measure import Workload  # noqa: E402
from edgeprune.models import load_reference, resolve_source  # noqa: E402
from edgeprune.models.synthetic import write_checkpoint  # noqa: E402
from edgeprune.pipeline import CandidateModel  # noqa: E402
from edgeprune.prune import Plan  # noqa: E402
from edgeprune.quantize import QuantSpec  # noqa: E402
from edgeprune.runtimes.base import Runner  # noqa: E402
from edgeprune.runtimes.llamacpp.settings import space  # noqa: E402
from edgeprune.runtimes.registry import get_runtime  # noqa: E402
from edgeprune.search.tuning import paired, tune  # noqa: E402
from edgeprune.stages import StageRunner  # noqa: E402


def model_file(name: str, cache_dir: Path, threads: int) -> Path:
    source = resolve_source(None if name == "embedded" else
                            str(write_checkpoint(name, cache_dir / "synthetic" / name)))
    reference = load_reference(source, cache_dir)
    stage = CandidateModel(reference, Plan(), QuantSpec("Q4_K_M", imatrix=False), None, threads)
    return stage.file(StageRunner(cache_dir / "stages").run(stage))


def measure(timer: Runner, path: Path, workload: Workload, settings: dict, default: dict, roofline: float,
            name: str, label: str) -> dict:
    """`settings` timed against `default` on the same file, side by side; one printed row."""
    record = timer.benchmark(path, replace(workload, settings=settings, baseline_settings=default), path)
    speedup, wins = paired(record.runs, record.baseline_runs)
    decode = statistics.median(r["decode_tok_s"] for r in record.runs)
    row = {"settings": settings, "label": label, "speedup_vs_default": speedup, "wins": wins,
           "decode_tok_s": decode, "roofline_share": decode / roofline,
           "default_decode_tok_s": statistics.median(r["decode_tok_s"] for r in record.baseline_runs),
           "ttft_s": statistics.median(r["ttft_s"] for r in record.runs)}
    shown = ", ".join(f"{k} {v}" for k, v in settings.items())
    print(f"{name:18s} {shown:50s} {speedup:9.2f}x {wins:9.0%} {decode:12.1f} {decode / roofline:8.0%} "
          f"{1000 * row['ttft_s']:8.0f}{'  ' + label if label else ''}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="embedded,llama-3.2-1b")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "benchmarks")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--prompt-tokens", default="64", help="prompt lengths, comma-separated (answers: 100 tokens)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "settings.json")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    grid = space(cores)
    default = {k: v[0] for k, v in grid.items()}
    bandwidth = measure_bandwidth(cores) * 1e9
    runtime = get_runtime("llama.cpp")

    def gap(settings: dict) -> str | None:
        return runtime.settings_gap(settings, cores)

    results = {"cores": cores, "bandwidth_gbs": bandwidth / 1e9, "repetitions": args.repetitions,
               "workload": f"{args.prompt_tokens} prompt + 100 answer tokens", "models": []}
    print(f"{cores} cores, {bandwidth / 1e9:.1f} GB/s streaming read")
    print(f"{'model@prompt':18s} {'settings':50s} {'vs default':>10s} {'faster in':>9s} {'decode tok/s':>12s} "
          f"{'roofline':>8s} {'TTFT ms':>8s}")
    with get_device("local") as device:
        timer = runtime.runner(device)
        for name in args.models.split(","):
            path = model_file(name, args.cache_dir, cores)
            per_token = ModelTraffic.from_gguf(path).weight_bytes_per_token
            roofline = bandwidth / per_token
            for prompt in map(int, args.prompt_tokens.split(",")):
                workload = Workload(tuple(range(100, 100 + prompt)), 100, cores, warmup=1,
                                    repetitions=args.repetitions)
                label = f"{name}@{prompt}"
                rows = []
                for values in itertools.product(*grid.values()):
                    settings = dict(zip(grid, values, strict=True))
                    if gap(settings) is None:  # e.g. a q8_0 KV cache without flash attention cannot run
                        rows.append(measure(timer, path, workload, settings, default, roofline, label, ""))
                tuning = tune(timer, path, workload, grid, gap)
                rows.append(measure(timer, path, workload, tuning.chosen, default, roofline, label,
                                    "tuned (tune's pick, timed again)"))
                results["models"].append({"model": name, "prompt_tokens": prompt, "file_bytes": path.stat().st_size,
                                          "weight_bytes_per_token": per_token, "roofline_tok_s": roofline,
                                          "rows": rows, "tuning": tuning.to_dict()})
                args.out.write_text(json.dumps(results, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
