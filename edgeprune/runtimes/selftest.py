"""Does the installed llama.cpp decode quantized models correctly on this CPU?

Run as a child process (`python -m edgeprune.runtimes.selftest WORKDIR`) so that a crash in a
native kernel -- the AMX kernels of a native build crash on the first quantized decode -- is seen
by the parent as a signal, not as its own death. It decodes a fixed text teacher-forced with the
embedded model as shipped (Q4_1) and as Q4_K_M (the build's type), and compares each position's
distribution with the F32 decode of the same weights. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

TEXT = (
    "The three primary colours of light are red, green and blue. Mixed in equal parts they give "
    "white light, and a screen shows every other colour by changing how bright each of the three "
    "small dots in a pixel is. Printers work the other way round: cyan, magenta and yellow inks "
    "take colours away from white paper."
)
# Bounds a correct build always meets and a broken kernel never does. Measured on a correct
# x86-64-v3 build (AMD EPYC, 2026-11-29), 66 positions: Q4_1 mean KLD 0.004 (top-1 86%, top-5
# containment 100%), Q4_K_M 0.085 (79%, 98%). Top-1 alone is a poor judge: near-ties swap between
# correct kernels; a broken one gives a KLD of several nats.
MAX_MEAN_KLD = {"Q4_1": 0.05, "Q4_K_M": 0.3}
MIN_TOP5 = 0.9
THREADS = 2


def _logits(path: Path, tokens: list[int]) -> np.ndarray:
    from edgeprune.runtimes.llamacpp import sequence_logits

    (logits,) = list(sequence_logits(path, np.asarray([tokens], dtype=np.int64), THREADS))
    return logits.astype(np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(reference: np.ndarray, logits: np.ndarray, max_kld: float) -> dict:
    """How far `logits` are from the reference's, position by position."""
    lr, lq = _log_softmax(reference), _log_softmax(logits)
    kld = float((np.exp(lr) * (lr - lq)).sum(axis=-1).mean())
    top1 = logits.argmax(axis=-1)
    top5 = np.argsort(-reference, axis=-1)[:, :5]
    contained = float((top5 == top1[:, None]).any(axis=-1).mean())
    return {"mean_kld": kld, "top1": float((top1 == reference.argmax(axis=-1)).mean()), "top5": contained,
            "max_kld": max_kld, "ok": bool(kld <= max_kld and contained >= MIN_TOP5)}


def run(workdir: Path) -> dict:
    from edgeprune.models.embedded import embedded_gguf
    from edgeprune.quantize.llamacpp import quantize
    from edgeprune.runtimes.llamacpp import system_info, tokenize, version

    workdir.mkdir(parents=True, exist_ok=True)
    shipped = embedded_gguf()
    f32, q4km = workdir / "embedded-F32.gguf", workdir / "embedded-Q4_K_M.gguf"
    t0 = time.perf_counter()
    if not f32.is_file():
        quantize(shipped, f32, "F32", THREADS, requantize=True)  # dequantizes the shipped Q4_1 weights
    if not q4km.is_file():
        quantize(f32, q4km, "Q4_K_M", THREADS)
    tokens = tokenize(shipped, TEXT)
    reference = _logits(f32, tokens)
    checks = {q: compare(reference, _logits(p, tokens), MAX_MEAN_KLD[q]) for q, p in (("Q4_1", shipped),
                                                                                        ("Q4_K_M", q4km))}
    return {"version": version(), "system_info": system_info(), "positions": len(tokens), "checks": checks,
            "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    from edgeprune.errors import RuntimeCrash

    try:
        report = run(Path(sys.argv[1]))
    except RuntimeCrash as e:  # llama.cpp runs in a grandchild (runtimes/isolated.py)
        report = {"crash": e.signal_name or str(e)}
    print(json.dumps(report))
