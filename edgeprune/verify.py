"""`edgeprune verify BUNDLE --device D`: is this bundle intact, does it run on the device, and
does it meet its budget there?

0. With --trusted-key, the manifest's signature (manifest.json.sig) must verify against that key
   before anything else is read: checksums catch corruption, only a signature catches tampering.
1. manifest.json must be a valid manifest (its file names plain paths inside the bundle), every
   entry a regular file (no symlinks, pipes or devices), every file's sha256 as listed, and no
   file the manifest does not know. A bundle that fails here is not executed.
2. The bundle's own binaries run on the device: every tool starts, and llama-completion loads
   the model and answers a fixed prompt greedily. The host (llama-cpp-python, the same llama.cpp
   source) then reads the device's answer token by token on the same GGUF: each token must be
   within the host's top TOP_K and within MAX_LOGIT_GAP of the host's best logit in that context.
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
import stat
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgeprune.atomic import remove_leftovers, write_atomic
from edgeprune.bundle import MANIFEST, SIGNATURE, Manifest, ManifestTarget, manifest_hashes
from edgeprune.config import DeviceConfig
from edgeprune.devices import Device, get_device, host_arch
from edgeprune.errors import EdgepruneError, VerificationFailed
from edgeprune.hashing import sha256_file
from edgeprune.measure import Workload
from edgeprune.report import render_markdown
from edgeprune.runtimes import isolated, llamacpp
from edgeprune.runtimes.base import Programs, Runner, Runtime
from edgeprune.runtimes.llamacpp.tools import ToolsRunner
from edgeprune.runtimes.registry import get_runtime
from edgeprune.search.budget import MEETS, Budget
from edgeprune.signing import SignatureInvalid, verify_file
from edgeprune.toolchain import TOOLS

log = logging.getLogger(__name__)

PROMPT = "The three primary colours of light are"
ANSWER_TOKENS = 16
SLO_REPETITIONS = 3
# The tolerance of a device's greedy answer, read by the host token by token. Kernels of other
# instruction sets round differently: the tokens where answers parted were 0.00-0.14 logits below
# the host's best (x86-64-v3 and aarch64 builds against the host's AVX-512 llama-cpp-python,
# Q4_K_M), and a context parted that way keeps the device's tokens at the host's top 1-2 (see
# README). A damaged or different model's tokens sit many logits down or outside the top 5.
TOP_K = 5
MAX_LOGIT_GAP = 1.0
EMULATORS = {"qemu-aarch64": "aarch64"}
# Temporary files earlier versions of verify wrote into the bundle (a killed verify left them).
LEGACY_TMP = tuple(f".{name}.tmp" for name in ("report.json", "report.md", MANIFEST))


@dataclass
class Agreement:
    """The device's greedy answer as the host reads it: per token, the host's rank and logit gap."""

    positions: int = 0  # device tokens judged, plus its end of text if it stopped early
    top1: int = 0  # of them, exactly the host's first choice
    max_gap: float = 0.0  # host's best logit minus the device token's, the largest over positions
    worst: dict[str, Any] | None = None  # the position of max_gap: token index, device and host pieces
    failure: str = ""  # why the answer is out of tolerance; empty if within it
    top_k: int = TOP_K
    gap_allowed: float = MAX_LOGIT_GAP

    @property
    def passed(self) -> bool:
        return not self.failure


@dataclass
class VerifyResult:
    bundle: Path
    device: str
    arch: str
    files_checked: int = 0
    signature: str = "unsigned"  # "unsigned", "signed, not checked" or "signed by <principal>, verified"
    tools: dict[str, str] = field(default_factory=dict)  # tool -> first line of its --version/--help
    prompt: str = PROMPT
    host_tokens: list[int] = field(default_factory=list)  # the host's own greedy answer
    host_text: str = ""
    device_text: str = ""
    agreement: dict[str, Any] = field(default_factory=dict)  # Agreement of device_text with the host
    device_decode_runs: int | None = None  # llama.cpp's eval count after the prompt
    device_decode_tok_s: float | None = None
    device_prefill_tok_s: float | None = None
    device_seconds: float = 0.0
    host_llama_cpp: str = ""
    bundle_llama_cpp: str = ""
    # The SLO check: None where the device cannot judge it (emulated, or another architecture).
    slo: dict[str, Any] | None = None
    slo_skipped: str = ""
    written_back: bool = False  # the SLO figures went into the bundle's report and manifest
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


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def manifest_path(bundle: Path) -> Path:
    """The bundle's manifest.json, if it is a regular file."""
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise EdgepruneError(f"Bundle {bundle} is not a directory; give the output directory of `edgeprune build`.")
    if not path.exists() and not path.is_symlink():
        raise EdgepruneError(f"{bundle} has no {MANIFEST}: it is not an edgeprune bundle (or the file was removed).")
    if not _regular_file(path):
        raise VerificationFailed(f"{path} is not a regular file (a symlink or special file); the bundle is damaged "
                                 "or tampered with, rebuild it.")
    return path


def read_manifest(path: Path) -> tuple[dict[str, Any], Manifest]:
    """The manifest as written (to write back into) and as validated (to read from)."""
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VerificationFailed(f"{path} is not valid JSON ({e}); the bundle is damaged, rebuild it.") from None
    if not isinstance(raw, dict):
        raise VerificationFailed(f"{path} holds a JSON {type(raw).__name__}, not an object; the bundle is damaged, "
                                 "rebuild it.")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise VerificationFailed(f"{path} is damaged: field {where}: {err['msg']} ({len(e.errors())} problem(s) in "
                                 "all); rebuild the bundle.") from None
    return raw, manifest


def check_signature(bundle: Path, trusted_key: Path | None) -> str:
    """The manifest's signature: verified against `trusted_key` (raising if it does not hold), or
    only noted."""
    signed = (bundle / SIGNATURE).exists() or (bundle / SIGNATURE).is_symlink()
    if trusted_key is None:
        return "signed, not checked" if signed else "unsigned"
    if not trusted_key.is_file():
        raise EdgepruneError(f"Trusted key {trusted_key} is not a file; give an OpenSSH public key file or an "
                             "allowed_signers file.")
    if signed and not _regular_file(bundle / SIGNATURE):
        raise SignatureInvalid(f"{bundle / SIGNATURE} is not a regular file (a symlink or special file); the bundle "
                               "was tampered with, rebuild it.")
    return f"signed by {verify_file(bundle / MANIFEST, trusted_key)}, verified"


def check_entries(bundle: Path) -> None:
    """Refuse anything in the bundle that is not a directory or a regular file, before any file is read:
    a symlink could point anywhere on the device, a pipe would block the checksums."""
    odd = []
    for root, dirs, files in os.walk(bundle):
        for name in dirs + files:
            path = Path(root, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                odd.append(f"{path.relative_to(bundle)} is a symlink")
            elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                odd.append(f"{path.relative_to(bundle)} is not a regular file")
    if odd:
        raise VerificationFailed(f"Bundle {bundle} holds what a bundle never does: {'; '.join(sorted(odd))}; "
                                 "rebuild or re-copy it.")


def check_files(bundle: Path, manifest: dict[str, Any]) -> int:
    """Compare every file with the manifest; raise naming each file that differs."""
    expected = manifest_hashes(manifest)
    present = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {MANIFEST, SIGNATURE}
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
    result = Agreement()
    try:
        prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        llm.eval(prompt_tokens)
        rest = device_output
        while rest or result.positions < answer_tokens:
            logits = llamacpp.last_logits(llm)
            ranked = [int(t) for t in np.argsort(-logits)[:TOP_K]]
            pieces = [_piece(vocab, t) for t in ranked]
            if rest:
                what = repr(rest[:24].decode(errors="replace"))
                match = next((i for i, p in enumerate(pieces) if p and rest.startswith(p)), None)
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


def _open_device(config: DeviceConfig, bundle: Path, arch: str) -> Device:
    device = get_device(config)
    if device.url == "local" and arch != host_arch():
        raise EdgepruneError(f"The bundle is built for {arch} and this machine is {host_arch()}: verify it with "
                             f"--device {default_device(arch)} or on an {arch} device.")
    return device


def _check_answer(result: VerifyResult, tools: ToolsRunner, model: Path, answer_tokens: int, threads: int) -> None:
    device = tools.device
    log.info("generating %d tokens with the bundle's llama-completion on %s", answer_tokens, device.url)
    completion = tools.greedy_completion(model, PROMPT, answer_tokens, threads)
    result.device_text, result.device_seconds = completion.text, completion.seconds
    result.device_decode_runs = completion.decode_runs
    result.device_decode_tok_s, result.device_prefill_tok_s = completion.decode_tok_s, completion.prefill_tok_s
    host_threads = min(threads, os.cpu_count() or 1)
    result.host_tokens, result.host_text = host_answer(model, PROMPT, answer_tokens, host_threads)
    judged = agreement(model, PROMPT, completion.output, answer_tokens, host_threads)
    result.agreement = asdict(judged)
    if not judged.passed:
        raise VerificationFailed(
            f"{model.name}: the device's greedy answer is not the host's within tolerance: {judged.failure}; device "
            f"{result.device_text!r}, host {result.host_text!r}; the binaries or the model do not run correctly on "
            f"{device.url}.")
    log.info("device answer: %d tokens within the host's top %d, %d its first choice, largest gap %.3f",
             judged.positions, TOP_K, judged.top1, judged.max_gap)


def _check_slo(timer: Runner, model: Path, target: ManifestTarget, repetitions: int) -> dict[str, Any]:
    """llama-bench with the SLO's workload and the target's threads, judged against the budget.

    A speed-up criterion needs the unpruned model timed alongside, which a bundle does not hold:
    only the latency budget and the RAM ceiling are judged on the device."""
    slo, device = target.slo, timer.device
    threads = min(target.hardware.cores, device.cores)
    prompt = tuple(range(slo.prompt_tokens))  # llama-bench draws its own prompt tokens; only the count matters
    workload = Workload(prompt, slo.answer_tokens, threads, warmup=1, repetitions=repetitions)
    log.info("timing the SLO workload (%d + %d tokens, %d threads) on %s", slo.prompt_tokens, slo.answer_tokens,
             threads, device.url)
    record = timer.benchmark(model, workload)
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
        write_atomic(bundle / name, text.encode())
        if name != MANIFEST:
            run_files[name] = sha256_file(bundle / name)


def verify(bundle: Path, device: DeviceConfig | None = None, answer_tokens: int = ANSWER_TOKENS,
           threads: int = 2, repetitions: int = SLO_REPETITIONS, trusted_key: Path | None = None) -> VerifyResult:
    t0 = time.perf_counter()
    if device is not None:
        get_device(device)  # a malformed URL is bad input, reported before the bundle is read
    path = manifest_path(bundle)
    signature = check_signature(bundle, trusted_key)  # before anything of the bundle is believed
    raw, manifest = read_manifest(path)
    try:
        remove_leftovers(bundle, LEGACY_TMP)
    except OSError as e:  # a read-only copy: a leftover then fails the checksums, named
        log.warning("could not clean %s: %s", bundle, e)
    check_entries(bundle)
    n_files = check_files(bundle, raw)
    if manifest.runtime not in Runtime.registry:
        raise EdgepruneError(f"Bundle {bundle} runs its model with {manifest.runtime!r}, which this edgeprune "
                             f"cannot run (it has {', '.join(sorted(Runtime.registry))}): verify it with the "
                             "edgeprune that built it.")
    runtime = get_runtime(manifest.runtime)
    toolchain = manifest.toolchain
    if toolchain is None:
        raise EdgepruneError(f"Bundle {bundle} holds no binaries (its build met no budget, or predates them); "
                             "nothing to run on a device.")
    config = device or DeviceConfig(url=default_device(toolchain.arch))
    models = sorted(name for name in manifest.files if name.endswith(runtime.format.suffix) and "/" not in name)
    if len(models) != 1:
        raise VerificationFailed(f"Bundle {bundle} should hold one model at its top level, found {len(models)}.")
    model = bundle / models[0]
    result = VerifyResult(bundle, config.url, toolchain.arch, files_checked=n_files, signature=signature,
                          host_llama_cpp=llamacpp.version(), bundle_llama_cpp=toolchain.llama_cpp)
    with _open_device(config, bundle, toolchain.arch) as dev:
        binaries = Programs(bundle / "bin", toolchain.arch)
        tools = ToolsRunner(dev, binaries)
        for tool in TOOLS:
            result.tools[tool] = tools.banner(tool)
        _check_answer(result, tools, model, answer_tokens, threads)
        target = manifest.target
        if dev.emulated:
            result.slo_skipped = f"{dev.url} is emulated: its timings say nothing about the target's budget"
        elif target is None or target.hardware.arch != dev.arch:
            result.slo_skipped = f"{dev.url} is {dev.arch}, not the target's architecture"
        else:
            result.slo = _check_slo(runtime.runner(dev, binaries), model, target, repetitions)
            if signature == "unsigned":
                write_back(bundle, raw, result.slo)
                result.written_back = True
            else:  # rewriting the manifest would void its signature
                log.warning("%s is signed: the device's figures are not written into it", bundle)
    result.seconds = time.perf_counter() - t0
    if result.slo is not None and not result.passed:
        s = result.slo
        where = f"the figures are in {bundle / 'report.json'}" if result.written_back else "the bundle is signed, " \
            "so they are not written into it"
        raise VerificationFailed(
            f"{models[0]} runs on {dev.url} but misses its budget there: {s['verdict']} (p90 "
            f"{s['summary']['latency_p90_s']:.3f} s, peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB; budget "
            f"{s['budget']['description']}); {where}.")
    return result
