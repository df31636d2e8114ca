"""llama.cpp through llama-cpp-python: load a GGUF, get its logits, time a generation.

The functions that take a model's path (`tokenize`, `sequence_logits`, `greedy_answer`) run
llama.cpp in a child process (`isolated`), so that a crash in it is an error, not the caller's
death. Those that take a loaded model (`load` and what works on its result) are for code already
running in such a process: the benchmark worker, isolated jobs.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.runtimes import isolated
from edgeprune.runtimes.llamacpp.settings import LlamaSettings

log = logging.getLogger(__name__)
_log_callback: Any = None  # keep the ctypes callback alive for the process lifetime


def route_logs_to_python() -> None:
    """Send llama.cpp's own log lines to `logging` (DEBUG) instead of stderr."""
    global _log_callback
    import llama_cpp

    if _log_callback is not None:
        return
    cpp_log = logging.getLogger("llama.cpp")

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        cpp_log.debug(text.decode("utf-8", errors="replace").rstrip())

    _log_callback = _callback
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__} (llama.cpp {llama_cpp.llama_version().decode()})"


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


def load(path: Path, n_ctx: int, threads: int, logits_all: bool = False, f32_kv_cache: bool = False,
         n_batch: int | None = None, settings: LlamaSettings | None = None) -> Any:
    """Load a GGUF. The KV cache is F16 as deployed, unless `f32_kv_cache` (for parity checks:
    F16 K/V rounding alone moves a pruned model's logits by up to ~0.2). `n_batch` (default
    `n_ctx`) bounds the tokens of one decode call, and with them the output and compute buffers.
    `settings`: threads, flash attention, physical batch and KV cache type, as a benchmark or a
    bundle runs them (default: `threads`, no flash attention, each decode call computed whole)."""
    import llama_cpp

    route_logs_to_python()
    settings = settings or LlamaSettings(threads, ubatch=n_batch or n_ctx)
    context = settings.context_kwargs(n_batch or n_ctx)
    if f32_kv_cache:
        context |= {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, **context)
    except (ValueError, RuntimeError) as e:
        raise EdgepruneError(f"llama.cpp cannot load {path.name}: {e}") from None


def tokenize(path: Path, text: str) -> list[int]:
    """`text` in the GGUF's own vocabulary (BOS added, as llama.cpp's tools do)."""
    return isolated.call("tokenizing text with", path, _tokenize, path, text)


def _tokenize(path: Path, text: str) -> list[int]:
    import llama_cpp

    route_logs_to_python()
    try:
        vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise EdgepruneError(f"llama.cpp cannot load {path.name}: {e}") from None
    try:
        return vocab.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        vocab.close()


_LOGITS_CHUNK = 128


def sequence_logits(path: Path, sequences: np.ndarray, threads: int, f32_kv_cache: bool = False,
                    doing: str = "computing the logits of",
                    settings: Mapping[str, Any] | None = None) -> Iterator[np.ndarray]:
    """llama.cpp's logits for every position of every sequence, one [len, vocab] array at a time
    (the model is loaded once). `doing` names the work in a crash's error; `settings`: flash
    attention and KV cache type to run with (`LlamaSettings`; threads and batch are this call's)."""
    return isolated.stream(doing, path, _sequence_logits, path, sequences, threads, f32_kv_cache, dict(settings or {}))


def _sequence_logits(path: Path, sequences: np.ndarray, threads: int, f32_kv_cache: bool,
                     settings: dict[str, Any]) -> Iterator[np.ndarray]:
    # Decoded _LOGITS_CHUNK tokens at a time into one result array: with a whole window per call,
    # llama.cpp's output and compute buffers and llama-cpp-python's `scores` each held a
    # [window, vocab] copy (~400 MiB here for 512 x 49k, against ~150 MiB this way).
    import llama_cpp as ll

    length = sequences.shape[1]
    chunk = min(_LOGITS_CHUNK, length)
    run_as = LlamaSettings.of(settings | {"threads": threads, "ubatch": chunk}, threads)
    llm = load(path, n_ctx=length, threads=threads, f32_kv_cache=f32_kv_cache, n_batch=chunk, settings=run_as)
    n_vocab = llm.n_vocab()
    batch = ll.llama_batch_init(chunk, 0, 1)
    logits = np.empty((length, n_vocab), dtype=np.float32)
    try:
        for seq in sequences:
            ll.llama_memory_clear(ll.llama_get_memory(llm.ctx), True)
            for start in range(0, len(seq), chunk):
                tokens = seq[start : start + chunk]
                for j, token in enumerate(tokens.tolist()):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, start + j, 1
                    batch.seq_id[j][0], batch.logits[j] = 0, True
                batch.n_tokens = len(tokens)
                code = ll.llama_decode(llm.ctx, batch)
                if code != 0:
                    raise EdgepruneError(f"llama.cpp could not evaluate {path.name} (llama_decode returned {code}).")
                rows = np.ctypeslib.as_array(ll.llama_get_logits(llm.ctx), shape=(len(tokens), n_vocab))
                logits[start : start + len(tokens)] = rows
            yield logits[: len(seq)]  # sent (pickled) before the next sequence overwrites it
    finally:
        ll.llama_batch_free(batch)
        llm.close()


def last_logits(llm: Any) -> np.ndarray:
    """Logits of the last evaluated token (llama-cpp-python keeps `scores` only with logits_all)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def greedy_answer(path: Path, prompt_tokens: list[int], max_tokens: int, threads: int,
                  f32_kv_cache: bool = False, stop_at_eog: bool = True) -> list[int]:
    """Greedy continuation that stops at end-of-generation tokens (unless told not to)."""
    return isolated.call("generating an answer with", path, _greedy_answer, path, prompt_tokens, max_tokens, threads,
                         f32_kv_cache, stop_at_eog)


def _greedy_answer(path: Path, prompt_tokens: list[int], max_tokens: int, threads: int, f32_kv_cache: bool,
                   stop_at_eog: bool) -> list[int]:
    llm = load(path, n_ctx=len(prompt_tokens) + max_tokens + 8, threads=threads, f32_kv_cache=f32_kv_cache)
    try:
        out: list[int] = []
        llm.eval(prompt_tokens)
        for _ in range(max_tokens):
            token = int(np.argmax(last_logits(llm)))
            if stop_at_eog and _is_eog(llm, token):
                break
            out.append(token)
            llm.eval([token])
        return out
    finally:
        llm.close()


def _is_eog(llm: Any, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def timed_generation(llm: Any, prompt_tokens: list[int], answer_tokens: int,
                     tokens: list[int] | None = None) -> dict[str, float]:
    """One SLO-shaped request: prefill the prompt, then decode exactly `answer_tokens` greedily
    (appended to `tokens`, if given).

    End-of-sequence tokens do not stop it: the SLO is about an answer of that length. Timed by
    wall clock around llama.cpp's evals (each returns when its logits are ready), as an
    application calling llama.cpp would see it.
    """
    out = tokens if tokens is not None else []
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_tokens)
    token = int(np.argmax(last_logits(llm)))
    out.append(token)
    t_first = time.perf_counter()
    for _ in range(answer_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(last_logits(llm)))
        out.append(token)
    t_end = time.perf_counter()
    ttft = t_first - t0
    decode_s = t_end - t_first
    return {
        "ttft_s": ttft,
        "latency_s": t_end - t0,
        "prefill_tok_s": len(prompt_tokens) / ttft,
        "decode_tok_s": (answer_tokens - 1) / decode_s if answer_tokens > 1 else float("nan"),
    }
