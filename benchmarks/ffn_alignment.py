"""FFN widths for K-quants: multiples of 256 (the K-quant super-block) or of 32 (every legacy block)?

On the embedded default model (FFN 1536 = 6 x 256), the same Wanda-sp channel ranking cut to
widths that are multiples of 256 and to nearby widths that are multiples of 32 only, Q4_K_M with an
importance matrix: the type llama.cpp gives each ffn_down (whose input width is the FFN width),
the GGUF size, the decode speed-up over the unpruned model timed side by side, and the mean KLD
on the default profile's held-out windows.

    .venv/bin/python benchmarks/ffn_alignment.py [--out benchmarks/results/ffn_alignment.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

import torch

from edgeprune.analysis.scores import select_channels
from edgeprune.config import load_profile, load_target
from edgeprune.devices import get_device
from edgeprune.evaluate import Quality
from edgeprune.gguf_file import read_gguf
from edgeprune.measure import Workload
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import (
    CandidateModel,
    CandidateQuality,
    calibration_splits,
    importance_of,
    reference_logprobs,
)
from edgeprune.prune import Plan
from edgeprune.quantize import QuantSpec
from edgeprune.runtimes.registry import get_runtime
from edgeprune.stages import StageRunner

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
WIDTHS = (1536, 1312, 1280, 1248, 1056, 1024, 992)


def down_types(path: Path) -> dict[str, int]:
    reader = read_gguf(path)
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors if t.name.endswith("ffn_down.weight")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ffn_alignment.json")
    args = parser.parse_args()
    runner = StageRunner(args.cache_dir / "stages")
    reference = load_reference(resolve_source(None), args.cache_dir)
    profile = load_profile("default")
    splits = calibration_splits(reference, profile.calibration, None, runner)
    ref_logps, _ = reference_logprobs(reference, splits, runner)
    importance = importance_of(reference, splits, profile.search, runner)
    n_layers = len(importance.channel_scores)
    target = load_target("demo")
    prompt = tuple(splits.heldout.flatten().tolist()[: target.slo.prompt_tokens])
    workload = Workload(prompt, target.slo.answer_tokens, args.threads, 1, args.repetitions)
    device = get_runtime().runner(get_device("local"))
    quant = QuantSpec("Q4_K_M", "default", imatrix=True)

    models = {}
    for width in WIDTHS:
        plan = Plan() if width == WIDTHS[0] else Plan(ffn=tuple(
            (l, select_channels(torch.tensor(importance.channel_scores[l]), width)) for l in range(n_layers)))
        stage = CandidateModel(reference, plan, quant, splits, args.threads)
        out = runner.run(stage)
        q = runner.run(CandidateQuality(stage.file(out), out.key, splits, ref_logps, args.threads))
        models[width] = (stage.file(out), out.result["size_bytes"], Quality(**q.result))
    baseline = models[WIDTHS[0]][0]

    rows = []
    for width, (path, size, quality) in models.items():
        record = device.benchmark(path, workload, baseline)
        pairs = list(zip(record.runs, record.baseline_runs, strict=True))
        rows.append({"ffn": width, "multiple_of_256": width % 256 == 0, "ffn_down_types": down_types(path),
                     "size_mib": size / MIB,
                     "decode_speedup": statistics.median(r["decode_tok_s"] / b["decode_tok_s"] for r, b in pairs),
                     "mean_kld": quality.mean_kld, "top1_agreement": quality.top1_agreement})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": workload.to_dict() | {"prompt": None}, "rows": rows}, indent=1))
    print("| FFN width | multiple of 256 | ffn_down types | MiB | decode speed-up | mean KLD | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{k} x{v}" for k, v in r["ffn_down_types"].items())
        print(f"| {r['ffn']} | {'yes' if r['multiple_of_256'] else 'no'} | {types} | {r['size_mib']:.1f} | "
              f"{r['decode_speedup']:.2f}x | {r['mean_kld']:.3f} | {r['top1_agreement'] * 100:.1f}% |")


if __name__ == "__main__":
    main()
