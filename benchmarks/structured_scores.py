"""Layer and sublayer importance of the embedded default model (SmolLM2-135M, 30 layers).

On 16 self-generated calibration windows of 256 tokens: per layer, Block Influence, angular
distance (single layers and blocks of 8), and the calibration-loss increase when each whole
layer, each attention sublayer and each MLP sublayer is skipped. Then which 8 layers each method
would drop, checked by the held-out loss of the pruned model (8 other windows), and the same for
removing the 8 cheapest attention sublayers or the 8 cheapest MLP sublayers instead.

The layer-by-layer pass is also run in a fresh process from the cached safetensors checkpoint (one
layer in memory at a time), against the whole model in another fresh process: their peak RSS, and
that their scores agree.

    .venv/bin/python benchmarks/structured_scores.py [--out benchmarks/results/structured_scores.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeprune.analysis.layer_scores import block_to_drop, layers_to_drop, token_nll
from edgeprune.analysis.layerwise import analyse_layerwise
from edgeprune.analysis.methods import LAYER_IMPORTANCE, UNIT_IMPORTANCE
from edgeprune.analysis.whole_model import analyse_model
from edgeprune.config import CalibrationSettings
from edgeprune.memory import current_rss_bytes
from edgeprune.models import load_reference, resolve_source
from edgeprune.models.reference import open_weights
from edgeprune.models.streamed import DecoderStream
from edgeprune.pipeline import calibration_splits
from edgeprune.prune import Plan, apply_plan
from edgeprune.prune.modules import materialize
from edgeprune.stages import StageRunner

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
DROP = 8


def _states_methods():
    methods = [LAYER_IMPORTANCE[name](g) for name in ("block_influence", "angular_distance")
               for g in ("layer", "attention", "mlp")]
    return methods + [LAYER_IMPORTANCE["angular_distance"](n=DROP)]


def _unit_methods():
    return [UNIT_IMPORTANCE[name]() for name in ("magnitude", "wanda_sp", "flap")]


def _load(cache_dir: Path):
    reference = load_reference(resolve_source(None), cache_dir)
    # As benchmarks/sparse.py: 16 + 8 windows, the 24 self-generation prompts once each.
    settings = CalibrationSettings(samples=16, heldout_samples=8, seq_len=256, seed=0)
    return reference, calibration_splits(reference, settings, None, StageRunner(cache_dir / "stages"))


def child(args) -> None:
    """One pass in this fresh process (so its peak RSS is its own): write its scores."""
    windows = torch.from_numpy(np.load(args.windows))
    before = current_rss_bytes()
    if args.child == "layerwise":
        stream = DecoderStream(open_weights(resolve_source(None)))
        result = analyse_layerwise(stream, windows, _states_methods(), _unit_methods())
    else:
        model = materialize(open_weights(resolve_source(None)))
        before = current_rss_bytes()
        result = analyse_model(model, windows, _states_methods(), _unit_methods())
    out = result.to_dict() | {"rss_before_bytes": before}
    out["unit_scores"] = {k: [{"heads": s["heads"]} for s in v] for k, v in out["unit_scores"].items()}
    args.result.write_text(json.dumps(out))


def _pass_in_child(kind: str, windows_file: Path, tmp: Path) -> dict:
    result = tmp / f"{kind}.json"
    subprocess.run([sys.executable, __file__, "--child", kind,
                    "--windows", str(windows_file), "--result", str(result)], check=True, stderr=subprocess.DEVNULL)
    return json.loads(result.read_text())


@torch.no_grad()
def heldout_nll(model, windows: torch.Tensor) -> float:
    return float(torch.cat([token_nll(model(input_ids=w[None], use_cache=False).logits, w[None])
                            for w in windows]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structured_scores.json")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "tests")
    parser.add_argument("--child", choices=("layerwise", "whole"), help=argparse.SUPPRESS)
    parser.add_argument("--windows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    reference, splits = _load(args.cache_dir)
    model, calib = materialize(reference.weights), splits.calib
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "calib.npy", calib.numpy(), allow_pickle=False)
        passes = {kind: _pass_in_child(kind, Path(tmp) / "calib.npy", Path(tmp))
                  for kind in ("layerwise", "whole")}
    agree = all(np.allclose(passes["layerwise"]["layer_scores"][k], passes["whole"]["layer_scores"][k],
                            rtol=1e-5, atol=1e-7) for k in passes["whole"]["layer_scores"])
    agree &= all(np.allclose(a["heads"], b["heads"], rtol=1e-5)
                 for k in passes["whole"]["unit_scores"]
                 for a, b in zip(passes["layerwise"]["unit_scores"][k], passes["whole"]["unit_scores"][k], strict=True))
    print(f"layer-by-layer (streamed) and whole-model scores agree: {agree}", flush=True)

    loss = analyse_model(model, calib, [LAYER_IMPORTANCE["loss_increase"](g) for g in ("layer", "attention", "mlp")])
    scores = {k: torch.tensor(v) for k, v in passes["layerwise"]["layer_scores"].items()} | loss.layer_scores

    # The first kept layer must keep its attention in llama.cpp (Plan.validate), so layer 0's
    # attention is never a candidate.
    choices = {
        "block_influence": ("layers", layers_to_drop(scores["block_influence/layer/n1"], DROP)),
        "angular_distance n=1": ("layers", layers_to_drop(scores["angular_distance/layer/n1"], DROP)),
        f"angular_distance n={DROP}": ("layers", block_to_drop(scores[f"angular_distance/layer/n{DROP}"], DROP)),
        "loss_increase": ("layers", layers_to_drop(scores["loss_increase/layer/n1"], DROP)),
        "attention by loss_increase": ("attention", layers_to_drop(scores["loss_increase/attention/n1"], DROP, [0])),
        "attention by block_influence": ("attention",
                                         layers_to_drop(scores["block_influence/attention/n1"], DROP, [0])),
        "mlp by loss_increase": ("mlp", layers_to_drop(scores["loss_increase/mlp/n1"], DROP)),
        "mlp by block_influence": ("mlp", layers_to_drop(scores["block_influence/mlp/n1"], DROP)),
    }
    base = heldout_nll(model, splits.heldout)
    drops = []
    for label, (what, layers) in choices.items():
        plan = {"layers": Plan(drop_layers=tuple(layers)), "attention": Plan(heads=tuple((l, ()) for l in layers)),
                "mlp": Plan(ffn=tuple((l, ()) for l in layers))}[what]
        nll = heldout_nll(apply_plan(model, plan), splits.heldout)
        drops.append({"method": label, "removes": what, "layers": layers, "heldout_nll": nll,
                      "heldout_nll_increase": nll - base})
        print(f"{label}: {layers} -> held-out NLL +{nll - base:.3f}", flush=True)

    print_report(scores, drops, passes, base, calib, splits.heldout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (embedded), fp32 torch",
        "calibration": list(calib.shape), "heldout": list(splits.heldout.shape), "heldout_base_nll": base,
        "layer_scores": {k: v.tolist() for k, v in scores.items()},
        "drops": drops,
        "passes": {kind: {k: p[k] for k in ("runner", "seconds", "peak_rss_bytes", "rss_before_bytes")}
                   for kind, p in passes.items()} | {"loss_increase_seconds": loss.seconds},
        "layerwise_equals_whole_model": bool(agree),
    }, indent=1))
    print(f"wrote {args.out}")


def print_report(scores, drops, passes, base, calib, heldout) -> None:
    n = len(scores["block_influence/layer/n1"])
    print(f"\nembedded SmolLM2-135M, fp32 torch; scores on {calib.shape[0]} x {calib.shape[1]} calibration tokens "
          f"(self-generated); held-out {heldout.shape[0]} x {heldout.shape[1]}, base NLL {base:.3f}")
    cols = [("BI", "block_influence/layer/n1"), ("ang", "angular_distance/layer/n1"),
            (f"ang{DROP}", f"angular_distance/layer/n{DROP}"), ("BI attn", "block_influence/attention/n1"),
            ("BI mlp", "block_influence/mlp/n1"), ("dL layer", "loss_increase/layer/n1"),
            ("dL attn", "loss_increase/attention/n1"), ("dL mlp", "loss_increase/mlp/n1")]
    print("layer " + " ".join(f"{c:>8}" for c, _ in cols))
    for i in range(n):
        cells = [f"{float(scores[k][i]):8.4f}" if i < len(scores[k]) else f"{'':>8}" for _, k in cols]
        print(f"{i:5d} " + " ".join(cells))
    attn, mlp = scores["loss_increase/attention/n1"], scores["loss_increase/mlp/n1"]
    print(f"\nskipping one sublayer, calibration loss increase: attention median {float(attn.median()):.4f} "
          f"(layers 1-{n - 1}: {float(attn[1:].median()):.4f}), MLP median {float(mlp.median()):.4f}; "
          f"attention cheaper than MLP in {int((attn < mlp).sum())}/{n} layers")
    print(f"\n{DROP} layers / sublayers each method removes, and the held-out NLL increase:")
    for d in drops:
        print(f"  {d['method']:<30} {d['removes']:<9} {d['layers']} +{d['heldout_nll_increase']:.3f}")
    print("\npeak RSS (fresh process each; BI, angular, sublayers, magnitude / Wanda-sp / FLAP):")
    for p in passes.values():
        peak = p["peak_rss_bytes"]
        print(f"  {p['runner']:<12} {p['seconds']:6.1f} s, before the pass {p['rss_before_bytes'] / MIB:6.0f} MiB, "
              f"peak {peak / MIB if peak else float('nan'):6.0f} MiB")


if __name__ == "__main__":
    main()
