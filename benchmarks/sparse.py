"""Unstructured and N:M sparsity on the embedded default model: dense, magnitude, Wanda, SparseGPT.

For each method at 50% unstructured, 2:4 and 4:8: perplexity, mean KLD and top-1 agreement against
the dense fp32 model on held-out windows (evaluated in torch fp32, so quantization does not blur
the comparison), and the pass's run time and memory. Each pass runs in a fresh process, so its
peak RSS and what it adds over the models already loaded are its own. Then llama.cpp's decode
speed of a 50% sparse model against the dense one, timed in alternation in one runner process,
at F16 (zeros kept exactly) and Q4_K_M.

    .venv/bin/python benchmarks/sparse.py [--seq-len 256] [--out benchmarks/results/sparse.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgeprune.config import CalibrationSettings, SparsitySpec
from edgeprune.devices import get_device
from edgeprune.evaluate import QualityTally, kl_divergence, log_probs, reference_log_probs, reference_perplexity
from edgeprune.export import Provenance, export_gguf
from edgeprune.gguf_file import decoder_zero_share, read_gguf
from edgeprune.measure import Workload
from edgeprune.memory import current_rss_bytes
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import calibration_splits
from edgeprune.prune.modules import materialize
from edgeprune.quantize import quantize
from edgeprune.runtimes.registry import get_runtime
from edgeprune.sparse import sparsify
from edgeprune.sparse.sequential import decoder_linear_weights, load_weights
from edgeprune.stages import StageRunner

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
# label -> (method, spec options)
VARIANTS = {
    f"{method} {pattern}": (method, options)
    for pattern, options in (("50%", {"sparsity": 0.5}), ("2:4", {"nm": "2:4"}), ("4:8", {"nm": "4:8"}))
    for method in ("magnitude", "wanda", "sparsegpt")
}
VARIANTS["sparsegpt 50% block-mask"] = ("sparsegpt", {"sparsity": 0.5, "mask_group": "block"})  # the reference's


def _load(args):
    reference = load_reference(resolve_source(None), args.cache_dir)
    # 16 + 8 windows: the 24 self-generation prompts once each, so no held-out prompt calibrates.
    settings = CalibrationSettings(samples=16, heldout_samples=8, seq_len=args.seq_len, seed=0)
    return reference, calibration_splits(reference, settings, None, StageRunner(args.cache_dir / "stages"))


def child(args) -> None:
    """One pass in this fresh process: write the sparse decoder weights and the pass's report."""
    method, options = VARIANTS[args.child]
    reference, splits = _load(args)
    model = materialize(reference.weights)  # a copy to sparsify
    settings = SparsitySpec(method=method, **options).settings()
    loaded = current_rss_bytes()
    report = sparsify(model, splits.calib, method, settings)
    save_file(decoder_linear_weights(model), args.result_dir / "weights.st")
    (args.result_dir / "report.json").write_text(json.dumps(report.to_dict() | {"rss_loaded_bytes": loaded}))


@torch.no_grad()
def torch_quality(model, windows: torch.Tensor, ref_logps: list[torch.Tensor]) -> dict:
    tally, per_window = QualityTally(), []
    for ref_logp, tokens in zip(ref_logps, windows, strict=True):
        logits = model(input_ids=tokens.unsqueeze(0), use_cache=False).logits[0]
        tally.add(ref_logp, logits, tokens)
        per_window.append(float(kl_divergence(ref_logp, log_probs(logits)).mean()))
    return tally.result().to_dict() | {"kld_per_window": per_window}


def decode_ratio(device, path: Path, baseline: Path, workload: Workload) -> dict:
    record = device.benchmark(path, workload, baseline)
    ratios = [r["decode_tok_s"] / b["decode_tok_s"] for r, b in zip(record.runs, record.baseline_runs, strict=True)]
    return {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in record.runs),
            "baseline_decode_tok_s": statistics.median(b["decode_tok_s"] for b in record.baseline_runs),
            "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse.json")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "tests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    reference, splits = _load(args)
    dense = materialize(reference.weights)
    ref_logps = reference_log_probs(dense, splits.heldout)
    rows = [{"variant": "dense", "sparsity": 0.0, **torch_quality(dense, splits.heldout, ref_logps)}]
    wanda50 = None
    with tempfile.TemporaryDirectory() as tmp:
        for label in VARIANTS:
            result_dir = Path(tmp) / label.replace(" ", "_").replace(":", "-").replace("%", "")
            result_dir.mkdir()
            cmd = [sys.executable, __file__, "--child", label, "--result-dir", str(result_dir),
                   "--cache-dir", str(args.cache_dir), "--seq-len", str(args.seq_len)]
            subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
            rep = json.loads((result_dir / "report.json").read_text())
            model = load_weights(materialize(reference.weights), load_file(result_dir / "weights.st"))
            rows.append({"variant": label, "sparsity": rep["overall_sparsity"], "seconds": rep["seconds"],
                         "rss_loaded_bytes": rep["rss_loaded_bytes"], "peak_rss_bytes": rep["peak_rss_bytes"],
                         **torch_quality(model, splits.heldout, ref_logps)})
            print(f"{label}: {rep['seconds']:.1f} s, KLD {rows[-1]['mean_kld']:.4f}", flush=True)
            if label == "wanda 50%":
                wanda50 = model

        prompt = tuple(splits.heldout[0, :64].tolist())
        workload = Workload(prompt, 100, args.threads, warmup=1, repetitions=args.repetitions)
        device, speed, files = get_runtime().runner(get_device("local")), [], {}
        for label, model in (("dense", dense), ("wanda", wanda50)):
            f32 = Path(tmp) / f"{label}-f32.gguf"
            export_gguf(model, reference.tokenizer_spec, f32, "F32", Provenance("embedded", reference.sha256, {}), "e")
            for qtype in ("F16", "Q4_K_M"):
                files[label, qtype] = Path(tmp) / f"{label}-{qtype}.gguf"
                quantize(f32, files[label, qtype], qtype, args.threads)
        for qtype in ("F16", "Q4_K_M"):
            sparse_file = files["wanda", qtype]
            speed.append({"quant": qtype, "size_mib": sparse_file.stat().st_size / MIB,
                          "dense_size_mib": files["dense", qtype].stat().st_size / MIB,
                          "zero_share": decoder_zero_share(read_gguf(sparse_file)),
                          **decode_ratio(device, sparse_file, files["dense", qtype], workload)})

    ref_ppl = reference_perplexity(ref_logps, splits.heldout)
    print_report(rows, speed, splits, ref_ppl, workload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"calibration": list(splits.calib.shape), "heldout": list(splits.heldout.shape),
                                    "reference_perplexity": ref_ppl, "rows": rows, "llama_cpp_speed": speed,
                                    "workload": workload.to_dict() | {"prompt": len(prompt)}}, indent=1))
    print(f"wrote {args.out}")


def print_report(rows: list[dict], speed: list[dict], splits, ref_ppl: float, workload: Workload) -> None:
    print(f"\nembedded SmolLM2-135M, fp32 torch; calibration {splits.calib.shape[0]} x {splits.calib.shape[1]} tokens "
          f"(self-generated), quality on {splits.heldout.shape[0]} held-out windows x {splits.heldout.shape[1]} "
          f"(dense PPL {ref_ppl:.3f})")
    w = max(len(r["variant"]) for r in rows)
    print(f"{'variant':<{w}} {'zeros':>6} {'PPL':>8} {'KLD':>7} {'top-1':>6} {'time s':>7} {'loaded MiB':>10} "
          f"{'peak MiB':>8} {'+MiB':>5}")
    for r in rows:
        if "seconds" in r:
            peak, loaded = r["peak_rss_bytes"], r["rss_loaded_bytes"]
            mem = f"{r['seconds']:7.1f} {loaded / MIB:10.0f} "
            mem += f"{peak / MIB:8.0f} {(peak - loaded) / MIB:5.0f}" if peak else f"{'-':>8} {'-':>5}"
        else:
            mem = ""
        print(f"{r['variant']:<{w}} {r['sparsity']:6.1%} {r['perplexity']:8.2f} {r['mean_kld']:7.4f} "
              f"{r['top1_agreement'] * 100:5.1f}% {mem}")
    by = {r["variant"]: r for r in rows}
    for pattern in ("50%", "2:4", "4:8"):
        order = sorted(("magnitude", "wanda", "sparsegpt"), key=lambda m: by[f"{m} {pattern}"]["mean_kld"])
        wins = sum(a < b for a, b in zip(by[f"sparsegpt {pattern}"]["kld_per_window"],
                                          by[f"wanda {pattern}"]["kld_per_window"], strict=True))
        print(f"{pattern}: by KLD {' < '.join(order)}; SparseGPT below Wanda in {wins}/{len(splits.heldout)} windows")
    print(f"\nllama.cpp decode, wanda 50% vs dense, {workload.answer_tokens} tokens after {len(workload.prompt)}, "
          f"{workload.threads} threads, median of {workload.repetitions} alternated runs:")
    for s in speed:
        print(f"  {s['quant']:<7} {s['decode_tok_s']:6.1f} vs {s['baseline_decode_tok_s']:6.1f} tok/s: "
              f"{s['ratio']:.2f}x (range {s['ratio_range'][0]:.2f}-{s['ratio_range'][1]:.2f}); "
              f"{s['size_mib']:.1f} vs {s['dense_size_mib']:.1f} MiB; {s['zero_share']:.1%} of decoder weights zero")


if __name__ == "__main__":
    main()
