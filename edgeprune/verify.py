"""`edgeprune verify BUNDLE --device D`: is this bundle intact, does it run on the device, and
does it meet its budget there?

1. Every file's sha256 against manifest.json (and no file the manifest does not know). A bundle
   that fails here is not executed: its binaries may be the tampered files.
2. The bundle's own binaries run on the device: every tool starts, and llama-completion loads
   the model and answers a fixed prompt greedily. The answer must equal the host's, computed by
   llama-cpp-python (the same llama.cpp source) on the same GGUF.
3. On a device that is not emulated and has the target's architecture (an ssh:// controller, or
   this machine for a native target), llama-bench runs the SLO's workload with the target's
   threads: PASS or FAIL against the latency budget and RAM ceiling, and the figures are written
   back into the bundle's report (report.json, report.md and their hashes in the manifest).

Devices: `local`, `qemu-aarch64` (an aarch64 bundle under user-mode emulation: proves it runs,
times nothing) and `ssh://[user@]host[:port]`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeprune.bundle import MANIFEST, manifest_hashes
from edgeprune.config import SLO, DeviceConfig
from edgeprune.devices import Device, get_device, host_arch
from edgeprune.devices.tools import greedy_completion, tool_banner
from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file
from edgeprune.measure import Workload
from edgeprune.report import render_markdown
from edgeprune.runtimes import isolated, llamacpp
from edgeprune.search.budget import MEETS, Budget
from edgeprune.toolchain import TOOLS

log = logging.getLogger(__name__)

PROMPT = "The three primary colours of light are"
ANSWER_TOKENS = 16
SLO_REPETITIONS = 3
# Kernel rounding moved the logits of the answers seen part by 0.00-0.14 (x86-64-v3 and -v2 builds
# against the host's AVX-512 llama-cpp-python, Q4_K_M): a swap closer than this is numerics.
NEAR_TIE_LOGIT_GAP = 0.25
TIE_CANDIDATES = 20
EMULATORS = {"qemu-aarch64": "aarch64"}


class VerificationFailed(EdgepruneError):
    """The bundle is not intact, or does not run correctly on the device."""


@dataclass
class VerifyResult:
    bundle: Path
    device: str
    arch: str
    files_checked: int = 0
    tools: dict[str, str] = field(default_factory=dict)  # tool -> first line of its --version/--help
    prompt: str = PROMPT
    host_tokens: list[int] = field(default_factory=list)
    host_text: str = ""
    device_text: str = ""
    device_decode_runs: int | None = None  # llama.cpp's eval count after the prompt
    device_decode_tok_s: float | None = None
    device_prefill_tok_s: float | None = None
    device_seconds: float = 0.0
    near_tie: dict[str, Any] | None = None  # where equal-but-for-rounding answers part, if they do
    host_llama_cpp: str = ""
    bundle_llama_cpp: str = ""
    # The SLO check: None where the device cannot judge it (emulated, or another architecture).
    slo: dict[str, Any] | None = None
    slo_skipped: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.slo is None or self.slo["verdict"] == MEETS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"bundle": str(self.bundle), "passed": self.passed}


def default_device(arch: str) -> str:
    """The bundle's own architecture here if the host has it, else its emulator."""
    if arch == host_arch():
        return "local"
    return next((name for name, earch in EMULATORS.items() if earch == arch), "local")


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise EdgepruneError(f"Bundle {bundle} is not a directory; give the output directory of `edgeprune build`.")
    if not path.is_file():
        raise EdgepruneError(f"{bundle} has no {MANIFEST}: it is not an edgeprune bundle (or the file was removed).")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VerificationFailed(f"{path} is not valid JSON ({e}); the bundle is damaged, rebuild it.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise VerificationFailed(f"{path} has no file list; the bundle is damaged, rebuild it.")
    return manifest


def check_files(bundle: Path, manifest: dict[str, Any]) -> int:
    """Compare every file with the manifest; raise naming each file that differs."""
    expected = manifest_hashes(manifest)
    present = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {MANIFEST}
    problems = []
    for name in sorted(expected):
        if name not in present:
            problems.append(f"{name} is missing")
        elif sha256_file(bundle / name) != expected[name]:
            problems.append(f"{name} does not match its sha256 in the manifest")
    problems += [f"{name} is not in the manifest" for name in sorted(present - set(expected))]
    if problems:
        raise VerificationFailed(f"Bundle {bundle} failed its checksums: {'; '.join(problems)}; rebuild or re-copy it.")
    return len(expected)


def host_answer(model: Path, prompt: str, answer_tokens: int, threads: int) -> tuple[list[int], str]:
    """Greedy tokens and their text as llama-completion prints them, from llama-cpp-python."""
    return isolated.call("answering the test prompt with", model, _host_answer, model, prompt, answer_tokens, threads)


def _host_answer(model: Path, prompt: str, answer_tokens: int, threads: int) -> tuple[list[int], str]:
    import llama_cpp

    llamacpp.route_logs_to_python()
    vocab_model = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        # llama-completion tokenizes with special tokens added and parsed; so does this.
        prompt_tokens = vocab_model.tokenize(prompt.encode(), add_bos=True, special=True)
        tokens = llamacpp.greedy_answer(model, prompt_tokens, answer_tokens, threads)
        vocab = llama_cpp.llama_model_get_vocab(vocab_model.model)
        text = b"".join(_piece(vocab, t) for t in tokens)
    finally:
        vocab_model.close()
    return tokens, text.decode("utf-8", errors="replace")


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


def near_tie(model: Path, prompt: str, host_tokens: list[int], device_text: str) -> dict[str, Any] | None:
    """Where the device's answer first leaves the host's, how far below the host's best token the
    device's choice was, by the host's logits in the same context. Different CPU kernels (SSE vs
    AVX-512, NEON) round differently, so two near-equal logits can swap: that is numerics, while
    a broken build picks tokens the host rates far lower. None: the device's text follows none
    of the host's top tokens."""
    return isolated.call("comparing answers with", model, _near_tie, model, prompt, host_tokens, device_text)


def _near_tie(model: Path, prompt: str, host_tokens: list[int], device_text: str) -> dict[str, Any] | None:
    import llama_cpp
    import numpy as np

    llm = llamacpp.load(model, n_ctx=len(host_tokens) + 256, threads=2)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        pieces = [_piece(vocab, t) for t in host_tokens]
        rest, k = device_text.encode(), 0
        while k < len(pieces) and pieces[k] and rest.startswith(pieces[k]):
            rest, k = rest[len(pieces[k]):], k + 1
        llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=True) + host_tokens[:k])
        logits = llamacpp.last_logits(llm)
        best = int(np.argmax(logits))
        for t in np.argsort(-logits)[:TIE_CANDIDATES]:
            piece = _piece(vocab, int(t))
            if piece and rest.startswith(piece):
                return {"token": k, "logit_gap": float(logits[best] - logits[t]),
                        "device": piece.decode(errors="replace"), "host": _piece(vocab, best).decode(errors="replace")}
        return None
    finally:
        llm.close()


def _open_device(config: DeviceConfig, bundle: Path, arch: str) -> Device:
    device = get_device(config)
    if device.url == "local" and arch != host_arch():
        raise EdgepruneError(f"The bundle is built for {arch} and this machine is {host_arch()}: verify it with "
                             f"--device {default_device(arch)} or on an {arch} device.")
    try:
        device.use_tools(bundle / "bin", arch)
    except EdgepruneError:
        device.close()
        raise
    return device


def _check_answer(result: VerifyResult, device: Device, model: Path, answer_tokens: int, threads: int) -> None:
    log.info("generating %d tokens with the bundle's llama-completion on %s", answer_tokens, device.url)
    completion = greedy_completion(device, model, PROMPT, answer_tokens, threads)
    result.device_text, result.device_seconds = completion.text, completion.seconds
    result.device_decode_runs = completion.decode_runs
    result.device_decode_tok_s, result.device_prefill_tok_s = completion.decode_tok_s, completion.prefill_tok_s
    result.host_tokens, result.host_text = host_answer(model, PROMPT, answer_tokens, min(threads, os.cpu_count() or 1))
    if result.device_text != result.host_text:
        tie = near_tie(model, PROMPT, result.host_tokens, result.device_text)
        if tie is None or tie["logit_gap"] > NEAR_TIE_LOGIT_GAP:
            where = f" (its token {tie['token']}, {tie['device']!r}, is {tie['logit_gap']:.2f} logits below the " \
                    f"host's choice {tie['host']!r})" if tie else ""
            raise VerificationFailed(
                f"{model.name}: the device's greedy answer differs from the host's{where}: device "
                f"{result.device_text!r}, host {result.host_text!r}; the binaries or the model do not run "
                f"correctly on {device.url}."
            )
        result.near_tie = tie
        log.info("answers part at token %d on a near-tie (%.3f logits): kernels round differently", tie["token"],
                 tie["logit_gap"])
        return
    # Same text; a full-length answer must also be the same number of tokens (the last one is
    # sampled, not evaluated), which equal text alone would not prove.
    full = len(result.host_tokens) == answer_tokens
    if full and result.device_decode_runs is not None and result.device_decode_runs != answer_tokens - 1:
        raise VerificationFailed(
            f"{model.name}: the device evaluated {result.device_decode_runs} answer tokens, the host "
            f"{answer_tokens - 1}, for the same text; the binaries do not run correctly on {device.url}."
        )


def _check_slo(device: Device, model: Path, target: dict[str, Any], repetitions: int) -> dict[str, Any]:
    """llama-bench with the SLO's workload and the target's threads, judged against the budget.

    A speed-up criterion needs the unpruned model timed alongside, which a bundle does not hold:
    only the latency budget and the RAM ceiling are judged on the device."""
    slo = SLO(**target["slo"])
    threads = min(target["hardware"]["cores"], device.cores)
    prompt = tuple(range(slo.prompt_tokens))  # llama-bench draws its own prompt tokens; only the count matters
    workload = Workload(prompt, slo.answer_tokens, threads, warmup=1, repetitions=repetitions)
    log.info("timing the SLO workload (%d + %d tokens, %d threads) on %s", slo.prompt_tokens, slo.answer_tokens,
             threads, device.url)
    record = device.benchmark(model, workload)
    budget = Budget(latency_s=slo.latency_budget_s, speedup=None, ram_bytes=Budget.from_slo(slo).ram_bytes)
    return {
        "device": device.url,
        "cpu": device.cpu,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget": budget.to_dict(),
        "speedup_not_judged": slo.speedup is not None,
        "verdict": budget.verdict(record),
        "summary": record.summary,
        "peak_rss_bytes": record.peak_rss_bytes,
        "threads": threads,
        "runtime": record.runtime,
        "benchmark": record.to_dict(),
    }


def write_back(bundle: Path, manifest: dict[str, Any], verification: dict[str, Any]) -> None:
    """Record the device's figures in report.json / report.md and their new hashes in the manifest.
    Each file is replaced whole (written aside, then renamed), the manifest last."""
    report_path = bundle / "report.json"
    report = json.loads(report_path.read_text())
    report.setdefault("verifications", []).append(verification)
    run_files = manifest.setdefault("run", {}).setdefault("files", {})
    for name, text in (("report.json", json.dumps(report, indent=1)), ("report.md", render_markdown(report)),
                       (MANIFEST, None)):
        if text is None:
            text = json.dumps(manifest, indent=1)
        tmp = bundle / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(bundle / name)
        if name != MANIFEST:
            run_files[name] = sha256_file(bundle / name)


def verify(bundle: Path, device: DeviceConfig | None = None, answer_tokens: int = ANSWER_TOKENS,
           threads: int = 2, repetitions: int = SLO_REPETITIONS) -> VerifyResult:
    t0 = time.perf_counter()
    if device is not None:
        get_device(device)  # a malformed URL is bad input, reported before the bundle is read
    manifest = read_manifest(bundle)
    toolchain = manifest.get("toolchain")
    n_files = check_files(bundle, manifest)
    if not toolchain:
        raise EdgepruneError(f"Bundle {bundle} holds no binaries (its build met no budget, or predates them); "
                             "nothing to run on a device.")
    arch = toolchain["arch"]
    config = device or DeviceConfig(url=default_device(arch))
    models = sorted(name for name in manifest["files"] if name.endswith(".gguf") and "/" not in name)
    if len(models) != 1:
        raise VerificationFailed(f"Bundle {bundle} should hold one model at its top level, found {len(models)}.")
    model = bundle / models[0]
    result = VerifyResult(bundle, config.url, arch, files_checked=n_files, host_llama_cpp=llamacpp.version(),
                          bundle_llama_cpp=toolchain["llama_cpp"])
    with _open_device(config, bundle, arch) as dev:
        for tool in TOOLS:
            result.tools[tool] = tool_banner(dev, tool)
        _check_answer(result, dev, model, answer_tokens, threads)
        target = manifest.get("target") or {}
        if dev.emulated:
            result.slo_skipped = f"{dev.url} is emulated: its timings say nothing about the target's budget"
        elif target.get("hardware", {}).get("arch") != dev.arch:
            result.slo_skipped = f"{dev.url} is {dev.arch}, not the target's architecture"
        else:
            result.slo = _check_slo(dev, model, target, repetitions)
            write_back(bundle, manifest, result.slo)
    result.seconds = time.perf_counter() - t0
    if result.slo is not None and not result.passed:
        s = result.slo
        raise VerificationFailed(
            f"{models[0]} runs on {dev.url} but misses its budget there: {s['verdict']} (p90 "
            f"{s['summary']['latency_p90_s']:.3f} s, peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB; budget "
            f"{s['budget']['description']}); the figures are in {bundle / 'report.json'}.")
    return result
