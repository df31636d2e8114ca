"""llama.cpp's quantizer (`llama_model_quantize`), called in-process through llama-cpp-python."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.runtimes.llamacpp import route_logs_to_python

# Quantization type, as llama.cpp's tools spell it -> llama_ftype constant in llama-cpp-python.
QUANT_FTYPES = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}


def quantize(src: Path, dst: Path, qtype: str, threads: int) -> None:
    """Quantize `src` (an F32/F16 GGUF) into `dst`, atomically."""
    import llama_cpp

    if qtype not in QUANT_FTYPES:
        raise EdgepruneError(f"Unknown quantization type {qtype}; choose one of {', '.join(QUANT_FTYPES)}.")
    route_logs_to_python()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[qtype])
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EdgepruneError(f"llama.cpp failed to quantize {src.name} to {qtype} (code {rc}).")
    os.replace(tmp, dst)
