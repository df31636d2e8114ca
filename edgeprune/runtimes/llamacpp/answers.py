"""llama.cpp's part of `verify`: the bundle's own llama-completion answers a fixed prompt greedily
on the device, and the host (llama-cpp-python, the same llama.cpp source) reads that answer token by
token on the same GGUF: each token must be within the host's top TOP_K and within MAX_LOGIT_GAP of
the host's best logit in that context."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

from edgeprune.devices.base import Device
from edgeprune.runtimes import isolated, llamacpp
from edgeprune.runtimes.base import Agreement, AnswerCheck, Programs
from edgeprune.runtimes.llamacpp.tools import ToolsRunner
from edgeprune.toolchain import TOOLS

log = logging.getLogger(__name__)

# The tolerance of a device's greedy answer, read by the host token by token. Kernels of other
# instruction sets round differently: the tokens where answers parted were 0.00-0.14 logits below
# the host's best (x86-64-v3 and aarch64 builds against the host's AVX-512 llama-cpp-python,
# Q4_K_M), and a context parted that way keeps the device's tokens at the host's top 1-2 (see
# README). A damaged or different model's tokens sit many logits down or outside the top 5.
TOP_K = 5
MAX_LOGIT_GAP = 1.0


def host_answer(model: Path, prompt: str, answer_tokens: int, threads: int) -> tuple[list[int], str]:
    """Greedy tokens and their text as llama-completion prints them, from llama-cpp-python."""
    # llama-completion tokenizes with special tokens added and parsed; so does this.
    tokens = llamacpp.greedy_answer(model, llamacpp.tokenize(model, prompt), answer_tokens, threads)
    return tokens, token_text(model, tokens).decode("utf-8", errors="replace")


def token_text(model: Path, tokens: list[int]) -> bytes:
    """What llama-completion prints for `tokens` of `model`."""
    import llama_cpp

    llamacpp.route_logs_to_python()
    vocab_model = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(vocab_model.model)
        return b"".join(_piece(vocab, t) for t in tokens)
    finally:
        vocab_model.close()


def _piece(vocab: Any, token: int) -> bytes:
    """A token's text exactly as llama-completion prints it (common_token_to_piece: no space
    stripping, special tokens unrendered); a character may span two tokens, hence bytes."""
    import llama_cpp

    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def agreement(model: Path, prompt: str, device_output: bytes, answer_tokens: int, threads: int) -> Agreement:
    """The device's answer judged by the host's llama.cpp, in a child process (see _agreement)."""
    return isolated.call("comparing answers with", model, _agreement, model, prompt, device_output, answer_tokens,
                         threads)


def _agreement(model: Path, prompt: str, device_output: bytes, answer_tokens: int, threads: int) -> Agreement:
    """Read the device's greedy answer with the host's logits, teacher-forced on the device's own tokens.

    llama-completion prints text, not token ids: at each position the device's token is the host's
    highest-ranked top-TOP_K token whose text starts what is left of the device's answer. It must
    be within MAX_LOGIT_GAP of the host's best. An answer shorter than `answer_tokens` ended on an
    end-of-generation token, which must meet the same rule where the text ends."""
    import llama_cpp
    import numpy as np

    # Already in llama.cpp's child process: tokenize with the loaded model, not in another child.
    # A prompt has at most one token per byte, plus BOS.
    llm = llamacpp.load(model, n_ctx=len(prompt.encode()) + 1 + len(device_output) + 8, threads=threads)
    result = Agreement(top_k=TOP_K, gap_allowed=MAX_LOGIT_GAP)
    try:
        prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        llm.eval(prompt_tokens)
        rest = device_output
        while rest or result.positions < answer_tokens:
            logits = llamacpp.last_logits(llm)
            ranked = [int(t) for t in np.argsort(-logits)[:TOP_K]]
            pieces = [_piece(vocab, t) for t in ranked]
            if rest and result.positions >= answer_tokens:
                result.failure = (f"the device printed {rest[:24].decode(errors='replace')!r} after its "
                                  f"{answer_tokens} tokens")
                return result
            if rest:
                what = repr(rest[:24].decode(errors="replace"))
                # A control token llama-completion does not print (empty piece) may come anywhere but at the end.
                match = next((i for i, (t, p) in enumerate(zip(ranked, pieces, strict=True)) if rest.startswith(p)
                              and (p or not llama_cpp.llama_vocab_is_eog(vocab, t))), None)
            else:
                what = "its end of text"
                match = next((i for i, t in enumerate(ranked) if llama_cpp.llama_vocab_is_eog(vocab, t)), None)
            k = result.positions
            if match is None:
                host = ", ".join(repr(p.decode(errors="replace")) for p in pieces)
                result.failure = (f"at token {k} the device continues with {what}, which none of the host's top "
                                  f"{TOP_K} tokens ({host}) begins")
                result.worst = {"token": k, "device": what, "host": pieces[0].decode(errors="replace"), "gap": None}
                return result
            gap = float(logits[ranked[0]] - logits[ranked[match]])
            result.positions += 1
            result.top1 += match == 0
            if result.worst is None or gap > result.max_gap:
                result.max_gap = gap
                device_piece = pieces[match].decode(errors="replace") if rest else "<end of text>"
                result.worst = {"token": k, "device": device_piece, "host": pieces[0].decode(errors="replace"),
                                "gap": gap, "rank": match + 1}
            if gap > MAX_LOGIT_GAP:
                result.failure = (f"at token {k} the device's {result.worst['device']!r} is {gap:.2f} logits below "
                                  f"the host's {result.worst['host']!r} (tolerance {MAX_LOGIT_GAP})")
                return result
            if not rest:
                return result
            rest = rest[len(pieces[match]):]
            llm.eval([ranked[match]])
        return result
    finally:
        llm.close()


def check_answer(device: Device, binaries: Programs, model: Path, prompt: str, answer_tokens: int,
                 threads: int) -> AnswerCheck:
    """Every program of the bundle starts on `device`; llama-completion's greedy answer there agrees
    with the host's reading of it, or VerificationFailed says where it parts."""
    tools = ToolsRunner(device, binaries)
    check = AnswerCheck(programs={tool: tools.banner(tool) for tool in TOOLS}, prompt=prompt,
                        host_runtime=llamacpp.version())
    log.info("generating %d tokens with the bundle's llama-completion on %s", answer_tokens, device.url)
    completion = tools.greedy_completion(model, prompt, answer_tokens, threads)
    check.device_text, check.device_seconds = completion.text, completion.seconds
    check.device_decode_runs = completion.decode_runs
    check.device_decode_tok_s, check.device_prefill_tok_s = completion.decode_tok_s, completion.prefill_tok_s
    host_threads = min(threads, os.cpu_count() or 1)
    check.host_tokens, check.host_text = host_answer(model, prompt, answer_tokens, host_threads)
    judged = agreement(model, prompt, completion.output, answer_tokens, host_threads)
    check.judge(judged, model, device.url, "the binaries")
    log.info("device answer: %d tokens within the host's top %d, %d its first choice, largest gap %.3f",
             judged.positions, TOP_K, judged.top1, judged.max_gap)
    return check
