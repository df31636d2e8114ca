"""Quantization types, importance matrix and per-tensor recipes on the embedded default model.

For each variant: file size, stored bits per weight, decode speed (tok/s, and the speed-up over
llama.cpp's default Q4_K_M measured alongside it in one runner process), and quality against the
fp32 reference on held-out windows (mean KLD, top-1 agreement). The importance matrix comes from
the calibration windows, never from the held-out ones.

    .venv/bin/python benchmarks/quant.py [--out benchmarks/results/quant.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edgeprune.build import default_cache_dir
from edgeprune.config import load_profile
from edgeprune.devices import get_device
from edgeprune.evaluate import QualityTally, reference_log_probs
from edgeprune.export import Provenance, export_gguf
from edgeprune.gguf_file import bits_per_weight, read_gguf
from edgeprune.measure import Workload
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import calibration_splits
from edgeprune.quantize import RECIPES, collect_imatrix, quantize, tensor_shapes
from edgeprune.runtimes import llamacpp
from edgeprune.stages import StageRunner

MIB = 1 << 20
# (label, quantization type, recipe, imatrix)
VARIANTS = [
    ("F16", "F16", "default", False),
    ("Q8_0", "Q8_0", "default", False),
    ("Q4_K_M", "Q4_K_M", "default", False),
    ("Q4_K_M +imatrix", "Q4_K_M", "default", True),
    ("Q4_K_M q4_0-narrow", "Q4_K_M", "q4_0-narrow", False),
    ("Q4_K_M q4_0-narrow +imatrix", "Q4_K_M", "q4_0-narrow", True),
    ("Q4_K_M iq4_nl-narrow +imatrix", "Q4_K_M", "iq4_nl-narrow", True),
    ("Q4_K_M q4_0-narrow-q5_0-output +imatrix", "Q4_K_M", "q4_0-narrow-q5_0-output", True),
    ("Q4_K_S +imatrix", "Q4_K_S", "default", True),
    ("Q3_K_M +imatrix", "Q3_K_M", "default", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    cache = default_cache_dir()
    profile = load_profile("default")
    reference = load_reference(resolve_source(None), cache)
    splits = calibration_splits(reference, profile.calibration, None, StageRunner(cache / "stages"))
    ref_logps = reference_log_probs(reference.model, splits.heldout)
    imatrix = collect_imatrix(reference.model, splits.calib)
    device = get_device("local")
    prompt = tuple((splits.heldout.flatten().tolist() * 2)[:64])
    workload = Workload(prompt, 64, args.threads, warmup=1, repetitions=7)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        export_gguf(reference.model, reference.tokenizer_spec, f32, "F32", Provenance("embedded", reference.sha256, {}),
                    "embedded")
        shapes = tensor_shapes(f32)
        files = {}
        for label, qtype, recipe, use_imatrix in VARIANTS:
            path = Path(tmp) / f"{len(files)}.gguf"
            quantize(f32, path, qtype, args.threads, imatrix if use_imatrix else None,
                     RECIPES[recipe].overrides(shapes))
            files[label] = path
        baseline = files["Q4_K_M"]
        for label, qtype, recipe, use_imatrix in VARIANTS:
            path = files[label]
            tally = QualityTally()
            logits = llamacpp.sequence_logits(path, splits.heldout.numpy(), args.threads)
            for ref_logp, cand, tokens in zip(ref_logps, logits, splits.heldout, strict=True):
                tally.add(ref_logp, cand, tokens)
            q = tally.result()
            bench = device.benchmark(path, workload, None if path == baseline else baseline)
            rows.append({
                "variant": label, "quant": qtype, "recipe": recipe, "imatrix": use_imatrix,
                "size_mib": path.stat().st_size / MIB, "bits_per_weight": bits_per_weight(read_gguf(path)),
                "decode_tok_s": bench.summary["decode_tok_s_p50"],
                "speedup_vs_q4_k_m": bench.speedup, "mean_kld": q.mean_kld, "top1_agreement": q.top1_agreement,
            })
            print(f"{label:<42} done", flush=True)

    print(f"\nembedded SmolLM2-135M, {len(splits.heldout)} held-out windows of {splits.heldout.shape[1]} tokens; "
          f"decode: {workload.answer_tokens} tokens after a {len(prompt)}-token prompt, {args.threads} threads, "
          f"median of {workload.repetitions}")
    print(f"{'variant':<42} {'MiB':>6} {'bpw':>5} {'tok/s':>6} {'vs Q4_K_M':>9} {'KLD':>7} {'top-1':>6}")
    for r in rows:
        print(f"{r['variant']:<42} {r['size_mib']:6.1f} {r['bits_per_weight']:5.2f} {r['decode_tok_s']:6.1f} "
              f"{r['speedup_vs_q4_k_m']:8.2f}x {r['mean_kld']:7.4f} {r['top1_agreement'] * 100:5.1f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": workload.to_dict() | {"prompt": len(prompt)}, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
