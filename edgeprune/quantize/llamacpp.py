"""llama.cpp's quantizer (`llama_model_quantize`) through llama-cpp-python, in a child process."""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.gguf_file import read_gguf
from edgeprune.runtimes import isolated
from edgeprune.runtimes.llamacpp import route_logs_to_python

log = logging.getLogger(__name__)

# Quantization type, as llama.cpp's tools spell it -> llama_ftype constant in llama-cpp-python.
QUANT_FTYPES = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
}

# (regex on the GGUF tensor name, ggml type name): the first matching pattern decides a tensor.
Override = tuple[str, str]


def _ggml_type(name: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"GGML_TYPE_{name}", None)
    if value is None:
        raise EdgepruneError(f"Unknown ggml tensor type {name}; use a name such as Q4_0, Q5_0, IQ4_NL, Q8_0, F16.")
    return int(value)


def _check_imatrix(src: Path, imatrix: Mapping[str, np.ndarray]) -> None:
    """Refuse an importance matrix that does not fit `src`, with a sentence naming the tensor.

    llama.cpp checks sizes only when it reaches a tensor, mid-file: a mismatch then fails the whole
    call with a bare error code (and is silently skipped for token_embd); names it does not know
    are ignored, so an imatrix of another model would quietly do nothing.
    """
    widths = {t.name: int(t.shape[0]) for t in read_gguf(src).tensors if len(t.shape) >= 2}
    for name, values in imatrix.items():
        if name in widths and values.size != widths[name]:
            raise EdgepruneError(
                f"The importance matrix entry for {name} has {values.size} values but the tensor has "
                f"{widths[name]} input columns; recompute it on the model being quantized."
            )
        if not np.isfinite(values).all():
            raise EdgepruneError(f"The importance matrix entry for {name} is not finite; recompute it.")
    unknown = sorted(set(imatrix) - set(widths))
    if len(unknown) == len(imatrix):
        raise EdgepruneError(
            f"None of the importance matrix's {len(imatrix)} entries (e.g. {unknown[0]}) names a tensor of "
            f"{src.name}; recompute it on the model being quantized."
        )
    if unknown:
        log.warning("ignoring importance matrix entries for tensors %s does not have: %s", src.name,
                    ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))


def _imatrix_array(imatrix: Mapping[str, np.ndarray], keep: list) -> ctypes.Array:
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: NULL-terminated
    for entry, (name, values) in zip(entries, sorted(imatrix.items()), strict=False):
        data = np.ascontiguousarray(values, dtype=np.float32)
        keep.append(data)
        entry.name = name.encode()
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    return entries


def _overrides_array(overrides: Sequence[Override]) -> ctypes.Array:
    import llama_cpp

    entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for entry, (pattern, type_name) in zip(entries, overrides, strict=False):
        try:  # llama.cpp compiles it with std::regex (ECMAScript); a bad one only fails the whole call
            re.compile(pattern)
        except re.error as e:
            raise EdgepruneError(f"The tensor-type override pattern {pattern!r} is not a valid regex ({e}).") from None
        entry.pattern = pattern.encode()
        entry.type = _ggml_type(type_name)
    return entries


def quantize(src: Path, dst: Path, qtype: str, threads: int, imatrix: Mapping[str, np.ndarray] | None = None,
             overrides: Sequence[Override] = (), requantize: bool = False) -> None:
    """Quantize `src` (an F32/F16 GGUF; any GGUF with `requantize`) into `dst`, atomically.

    `imatrix`: GGUF tensor name -> mean of x^2 per input column, which weights the rounding error
    of each column. `overrides`: (regex, ggml type) pairs, first match wins; a matching tensor skips
    llama.cpp's mixture, but its shape fallback still applies (Q4_K on a 576-wide tensor still
    becomes Q5_0). F32/F16/BF16 ignore overrides. llama.cpp runs in a child process; `dst` appears
    only when it is complete.
    """
    if qtype not in QUANT_FTYPES:
        raise EdgepruneError(f"Unknown quantization type {qtype}; choose one of {', '.join(QUANT_FTYPES)}.")
    if imatrix:
        _check_imatrix(src, imatrix)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        isolated.call("quantizing", src, _quantize, src, tmp, qtype, threads, imatrix, overrides, requantize)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # whatever a failed or killed quantizer left


def _quantize(src: Path, dst: Path, qtype: str, threads: int, imatrix: Mapping[str, np.ndarray] | None,
              overrides: Sequence[Override], requantize: bool) -> None:
    import llama_cpp

    route_logs_to_python()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[qtype])
    params.nthread = threads
    params.allow_requantize = requantize
    keep: list = []  # the buffers the params point into must outlive the call
    if imatrix:
        keep.append(_imatrix_array(imatrix, keep))
        params.imatrix = keep[-1]
    if overrides:
        keep.append(_overrides_array(overrides))
        params.tt_overrides = keep[-1]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise EdgepruneError(f"llama.cpp failed to quantize {src.name} to {qtype} (code {rc}).")
