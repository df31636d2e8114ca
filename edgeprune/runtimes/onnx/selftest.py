"""Does the installed onnxruntime compute edgeprune's ONNX graphs correctly on this CPU?

Run as a child process (`python -m edgeprune.runtimes.onnx.selftest WORKDIR`): a crash in a native
kernel is then a signal the parent reads, not its own death. A small random-weight Llama of real
layer widths is written as ONNX in fp32 and in each quantized type edgeprune ships (MatMulNBits
int4 and int8, int8 activations: the kernels ONNX Runtime picks for this CPU's instruction set),
and each file's logits on a fixed sequence are compared: fp32 with torch's, the quantized ones with
fp32's. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# A small real model's widths (SmolLM2-135M's) and vocabulary, two layers: the int8-activation
# kernels take their blocked paths, and the files are written in seconds.
PRESET = dict(name="doctor-tiny", hidden=576, layers=2, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
              tied=True, rope_theta=100000.0, max_positions=2048)
TOKENS = [(7 + 37 * i) % 4096 for i in range(48)]
THREADS = 2
# Error relative to the reference logits' spread (their standard deviation over the vocabulary),
# averaged over positions. Measured on a correct build (AMD EPYC, x86-64, onnxruntime 1.32.0):
# fp32 vs torch 9e-7, INT8 0.020, INT4 0.236, INT4_B128 0.283; logits unrelated to the reference's
# give about 1.4, a broken kernel NaN or more.
MAX_ERROR = {"F32": 1e-3, "INT8": 0.1, "INT4": 0.4, "INT4_B128": 0.5}


def relative_error(reference: np.ndarray, logits: np.ndarray) -> float:
    spread = reference.std(axis=-1)
    err = np.sqrt(((logits - reference) ** 2).mean(axis=-1)) / spread
    return float(err.mean()) if np.isfinite(err).all() else float("inf")


def run(workdir: Path) -> dict:
    import onnxruntime
    import torch

    from edgeprune.export import Provenance
    from edgeprune.models import resolve_source
    from edgeprune.models.reference import open_weights
    from edgeprune.models.synthetic import Preset, write_checkpoint
    from edgeprune.prune import Plan
    from edgeprune.prune.modules import materialize
    from edgeprune.runtimes.onnx.llama import write_onnx
    from edgeprune.runtimes.onnx.session import sequence_logits
    from edgeprune.runtimes.onnx.weights import WEIGHTS

    t0 = time.perf_counter()
    checkpoint = write_checkpoint(Preset(**PRESET), workdir / PRESET["name"])
    store = open_weights(resolve_source(str(checkpoint)))
    tokens = np.asarray([TOKENS], dtype=np.int64)
    with torch.no_grad():
        reference = materialize(store, Plan())(torch.from_numpy(tokens)).logits[0].double().numpy()

    def logits(quant: str, files: Path) -> np.ndarray:
        path = files / f"{quant}.onnx"
        write_onnx(store, Plan(), path, WEIGHTS[quant], Provenance("doctor", "", {}), "doctor", context=len(TOKENS))
        (out,) = list(sequence_logits(path, tokens, THREADS))
        return out.astype(np.float64)

    checks = {}
    with tempfile.TemporaryDirectory(dir=workdir) as files:  # 400 MB, rewritten in seconds: not kept
        fp32 = logits("F32", Path(files))
        for quant in WEIGHTS:
            against, name = (reference, "torch") if quant == "F32" else (fp32, "F32")
            error = relative_error(against, fp32 if quant == "F32" else logits(quant, Path(files)))
            checks[quant] = {"error": error, "max_error": MAX_ERROR[quant], "against": name,
                             "ok": error <= MAX_ERROR[quant]}
    return {"version": onnxruntime.__version__, "positions": len(TOKENS), "checks": checks,
            "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]))))
