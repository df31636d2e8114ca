"""ONNX candidates against GGUF ones on the embedded default model: file size, time to write, and
quality against the fp32 reference on the held-out windows (mean KLD, top-1, perplexity), for
the unpruned model and two pruned ones chosen as a build chooses them (the least important layers
by the default profile's importance; then also query heads), through the build's own stages.

ONNX: fp32, int8, and int4 (blocks of 32 and 128) by round-to-nearest or by GPTQ on the
calibration windows. GGUF: Q8_0, Q4_K_M with and without an importance matrix. Calibration and
held-out windows are the default profile's kind (self-generated from disjoint prompts).

With `--time`, each file is also timed as a build times it against its baseline: alternating with
the unpruned Q4_K_M (no importance matrix), one model per worker process, 64 prompt + 100 answer
tokens, medians of the paired decode and end-to-end ratios.

    .venv/bin/python benchmarks/onnx_quality.py [--time] [--out benchmarks/results/onnx_quality.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

from edgeprune.config import CalibrationSettings, load_profile
from edgeprune.devices import get_device
from edgeprune.measure import Workload
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import (
    CandidateModel,
    CandidateQuality,
    calibration_splits,
    importance_of,
    reference_logprobs,
)
from edgeprune.prune import ModelShape, Plan
from edgeprune.quantize import QuantSpec
from edgeprune.runtimes.base import Runner
from edgeprune.runtimes.llamacpp.gguf_format import GGUF
from edgeprune.runtimes.onnx.onnx_format import ONNX
from edgeprune.runtimes.registry import get_runtime
from edgeprune.search import HeadStructure, SearchSpace, State
from edgeprune.stages import StageRunner

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
# label -> (format, quantization type, calibrated)
VARIANTS = {
    "ONNX fp32": (ONNX, "F32", False),
    "ONNX int8": (ONNX, "INT8", False),
    "ONNX int4 b32 RTN": (ONNX, "INT4", False),
    "ONNX int4 b32 GPTQ": (ONNX, "INT4", True),
    "ONNX int4 b128 RTN": (ONNX, "INT4_B128", False),
    "ONNX int4 b128 GPTQ": (ONNX, "INT4_B128", True),
    "GGUF Q8_0": (GGUF, "Q8_0", False),
    "GGUF Q4_K_M": (GGUF, "Q4_K_M", False),
    "GGUF Q4_K_M +imatrix": (GGUF, "Q4_K_M", True),
}
# The search's own states (a fixed middle block of layers, tried first, lost KLD 4.7 unquantized).
PLANS = {"unpruned": State(0), "-4 layers": State(4), "-8 layers, 6 heads": State(8, HeadStructure(3, 2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_quality.json")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "tests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--time", action="store_true", help="time each file against the unpruned Q4_K_M")
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        measure(args, stack)


def measure(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:

    reference = load_reference(resolve_source(None), args.cache_dir)
    runner = StageRunner(args.cache_dir / "stages")
    settings = CalibrationSettings(samples=16, heldout_samples=8, seq_len=256, seed=0)
    splits = calibration_splits(reference, settings, None, runner)
    ref_logps, ref_ppl = reference_logprobs(reference, splits, runner)
    search = load_profile("default").search
    space = SearchSpace(ModelShape.from_config(reference.config), importance_of(reference, splits, search, runner),
                        search)
    rows = []
    timers = None
    if args.time:
        base_stage = CandidateModel(reference, Plan(), QuantSpec("Q4_K_M", imatrix=False), None, args.threads)
        baseline = base_stage.file(runner.run(base_stage))
        workload = Workload(tuple(range(100, 164)), 100, args.threads, warmup=1, repetitions=args.repetitions)
        device = stack.enter_context(get_device("local"))
        timers = {f.name: get_runtime(r).runner(device) for f, r in ((GGUF, "llama.cpp"), (ONNX, "onnxruntime"))}
    for plan_name, state in PLANS.items():
        plan = space.plan(state)
        for label in args.variants:
            fmt, quant, calibrated = VARIANTS[label]
            stage = CandidateModel(reference, plan, QuantSpec(quant, imatrix=calibrated), splits, args.threads,
                                   fmt=fmt)
            t0 = time.perf_counter()
            model = runner.run(stage)
            built = time.perf_counter() - t0
            quality = runner.run(CandidateQuality(stage.file(model), model.key, splits, ref_logps, args.threads,
                                                  fmt=fmt)).result
            rows.append({"plan": plan_name, "plan_detail": plan.to_dict(), "variant": label, "format": fmt.name,
                         "quant": quant,
                         "calibrated": calibrated, "size_mib": model.result["size_bytes"] / MIB,
                         "write_seconds": built if not model.cached else None, **quality,
                         **(timed(timers[fmt.name], stage.file(model), workload, baseline) if timers else {})})
            print(f"{plan_name} {label} done", flush=True)
    print(f"\nembedded SmolLM2-135M; quality on {splits.heldout.shape[0]} held-out windows x {splits.heldout.shape[1]} "
          f"tokens (fp32 reference PPL {ref_ppl:.3f}); calibration {splits.calib.shape[0]} x {splits.calib.shape[1]}")
    print(f"{'plan':<18} {'variant':<22} {'MiB':>6} {'write s':>8} {'KLD':>7} {'top-1':>6} {'PPL':>7}"
          + (f" {'decode':>7} {'latency':>7}" if timers else ""))
    for r in rows:
        seconds = "cached" if r["write_seconds"] is None else f"{r['write_seconds']:.1f}"
        print(f"{r['plan']:<18} {r['variant']:<22} {r['size_mib']:6.1f} {seconds:>8} {r['mean_kld']:7.4f} "
              f"{r['top1_agreement'] * 100:5.1f}% {r['perplexity']:7.3f}"
              + (f" {r['decode_vs_q4_k_m']:6.2f}x {r['latency_speedup']:6.2f}x" if timers else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"heldout": list(splits.heldout.shape), "calibration": list(splits.calib.shape),
                                    "reference_perplexity": ref_ppl, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def timed(timer: Runner, model: Path, workload: Workload, baseline: Path) -> dict:
    record = timer.alternate(model, workload, baseline)
    ratios = [r["decode_tok_s"] / b["decode_tok_s"] for r, b in zip(record.runs, record.baseline_runs, strict=True)]
    return {"decode_vs_q4_k_m": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
            "latency_speedup": record.speedup, "peak_rss_mib": record.peak_rss_bytes / MIB}


if __name__ == "__main__":
    main()
