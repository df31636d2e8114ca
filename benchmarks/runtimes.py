"""Decode speed of ONNX Runtime files against llama.cpp's Q4_K_M on the embedded default model.

Each ONNX variant is timed one model per worker process, alternating with the unpruned Q4_K_M
GGUF run by llama.cpp (the build's baseline), on the SLO-shaped request of
`benchmarks/quant.py` (64 prompt tokens, 100 answer tokens): medians of the paired ratios, so a
shared machine's drift cancels. Weights are rounded to nearest (speed does not depend on which
codes a quantizer picks). `accuracy_level` 4 (the default of the quantized types) lets
MatMulNBits quantize activations to int8; one variant computes in fp32 for contrast. The INT4
file is also timed with both models in one process, as a build's worker does when both fit in
memory: the two rows show whether the two runtimes' threads slow each other there.

    .venv/bin/python benchmarks/runtimes.py [--out benchmarks/results/runtimes.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from edgeprune.devices import get_device
from edgeprune.export import Provenance
from edgeprune.measure import BenchmarkRecord, Workload
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import CandidateModel
from edgeprune.prune import Plan
from edgeprune.quantize import QuantSpec
from edgeprune.runtimes.base import Runtime
from edgeprune.runtimes.onnx.llama import OnnxWeights, write_onnx
from edgeprune.runtimes.onnx.weights import WEIGHTS
from edgeprune.runtimes.registry import get_runtime
from edgeprune.stages import StageRunner

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
VARIANTS = WEIGHTS | {"INT4, fp32 compute": OnnxWeights(bits=4, block=32)}
TOGETHER = "INT4"  # also timed with both models in one process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtimes.json")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "tests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args()

    reference = load_reference(resolve_source(None), args.cache_dir)
    runner = StageRunner(args.cache_dir / "stages")
    stage = CandidateModel(reference, Plan(), QuantSpec("Q4_K_M", imatrix=False), None, args.threads)
    baseline = stage.file(runner.run(stage))
    workload = Workload(tuple(range(100, 164)), 100, args.threads, warmup=1, repetitions=args.repetitions)
    onnx = get_runtime("onnxruntime")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, get_device("local") as device:
        timer = onnx.runner(device)
        for label, weights in VARIANTS.items():
            path = Path(tmp) / f"{label.replace(' ', '_').replace(',', '')}.onnx"
            write_onnx(reference.weights, Plan(), path, weights, Provenance("embedded", reference.sha256, {}),
                       "embedded")
            modes = {"per process": timer.alternate(path, workload, baseline)}
            if label == TOGETHER:
                modes["one process"] = timer.side_by_side(path, workload, baseline)
            for mode, record in modes.items():
                rows.append(row(label, mode, weights, path, record, onnx))
            for f in onnx.format.files(path):
                f.unlink()
            print(f"{label} done", flush=True)
    print(f"\nembedded SmolLM2-135M, unpruned; {len(workload.prompt)} prompt + {workload.answer_tokens} answer tokens, "
          f"{args.threads} threads, {args.repetitions} runs alternating with llama.cpp Q4_K_M")
    print(f"{'ONNX variant':<20} {'mode':<12} {'MiB':>6} {'read/tok':>8} {'tok/s':>6} {'Q4_K_M':>6} {'decode':>7} "
          f"{'range':>11} {'latency':>7} {'RSS':>5}")
    for r in rows:
        lo, hi = r["ratio_range"]
        print(f"{r['variant']:<20} {r['mode']:<12} {r['size_mib']:6.1f} {r['read_mib_per_token']:8.1f} "
              f"{r['decode_tok_s']:6.1f} {r['baseline_decode_tok_s']:6.1f} {r['decode_vs_q4_k_m']:6.2f}x "
              f"{lo:5.2f}-{hi:<5.2f} {r['latency_speedup']:6.2f}x {r['peak_rss_mib']:5.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": workload.to_dict(), "baseline": "Q4_K_M (llama.cpp)", "rows": rows},
                                   indent=1))
    print(f"wrote {args.out}")


def row(label: str, mode: str, weights: OnnxWeights, path: Path, record: BenchmarkRecord, onnx: Runtime) -> dict:
    ratios = [r["decode_tok_s"] / b["decode_tok_s"] for r, b in zip(record.runs, record.baseline_runs, strict=True)]
    traffic = onnx.traffic(path)
    return {"variant": label, "mode": mode, "weights": weights.describe(),
            "size_mib": onnx.format.size_bytes(path) / MIB,
            "read_mib_per_token": traffic.weight_bytes_per_token / MIB,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in record.runs),
            "baseline_decode_tok_s": statistics.median(b["decode_tok_s"] for b in record.baseline_runs),
            "decode_vs_q4_k_m": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
            "latency_speedup": record.speedup, "peak_rss_mib": record.peak_rss_bytes / MIB,
            "runtime": record.runtime, "system_info": record.system_info,
            "one_model_per_process": record.one_model_per_process}


if __name__ == "__main__":
    main()
