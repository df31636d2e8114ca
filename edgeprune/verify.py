"""`edgeprune verify BUNDLE --device D`: is this bundle intact, does it run on the device, and
does it meet its budget there?

0. With --trusted-key, the manifest's signature (manifest.json.sig) must verify against that key
   before anything else is read: checksums catch corruption, only a signature catches tampering.
1. manifest.json must be a valid manifest (its file names plain paths inside the bundle), every
   entry a regular file (no symlinks, pipes or devices), every file's sha256 as listed, and no
   file the manifest does not know. A bundle that fails here is not executed.
2. The bundle's own programs run on the device: each one starts, and the model answers a fixed
   prompt greedily there as the host's runtime would (the runtime says how it is judged: for
   llama.cpp, runtimes/llamacpp/answers.py).
3. On a device that is not emulated and has the target's architecture (an ssh:// controller, or
   this machine for a native target), the runtime times the SLO's workload with the target's
   threads: PASS or FAIL against the latency budget and RAM ceiling, and the figures are written
   back into the bundle's report (report.json, report.md and their hashes in the manifest).

Devices: `local`, `qemu-aarch64` (an aarch64 bundle under user-mode emulation: proves it runs,
times nothing) and `ssh://[user@]host[:port]`.
"""

from __future__ import annotations

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
from edgeprune.report import render_reports
from edgeprune.runtimes.base import AnswerCheck, Runner, Runtime
from edgeprune.runtimes.registry import get_runtime
from edgeprune.search.budget import MEETS, Budget
from edgeprune.signing import SignatureInvalid, verify_file

log = logging.getLogger(__name__)

PROMPT = "The three primary colours of light are"
ANSWER_TOKENS = 16
SLO_REPETITIONS = 3
EMULATORS = {"qemu-aarch64": "aarch64"}
# Temporary files earlier versions of verify wrote into the bundle (a killed verify left them).
LEGACY_TMP = tuple(f".{name}.tmp" for name in ("report.json", "report.md", MANIFEST))


@dataclass
class VerifyResult:
    bundle: Path
    device: str
    arch: str
    files_checked: int = 0
    signature: str = "unsigned"  # "unsigned", "signed, not checked" or "signed by <principal>, verified"
    runtime: str = ""
    bundle_runtime: str = ""  # the runtime's version the bundle's programs were built from
    answer: AnswerCheck = field(default_factory=AnswerCheck)
    # The SLO check: None where the device cannot judge it (emulated, or another architecture).
    slo: dict[str, Any] | None = None
    slo_skipped: str = ""
    written_back: bool = False  # the SLO figures went into the bundle's report and manifest
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.slo is None or self.slo["verdict"] == MEETS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d | d.pop("answer") | {"bundle": str(self.bundle), "passed": self.passed}


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


def _open_device(config: DeviceConfig, bundle: Path, arch: str) -> Device:
    device = get_device(config)
    if device.url == "local" and arch != host_arch():
        raise EdgepruneError(f"The bundle is built for {arch} and this machine is {host_arch()}: verify it with "
                             f"--device {default_device(arch)} or on an {arch} device.")
    return device


def _check_slo(timer: Runner, model: Path, target: ManifestTarget, settings: dict[str, Any],
               repetitions: int) -> dict[str, Any]:
    """The SLO's workload timed with the bundle's runtime settings (threads: the target's unless
    chosen, at most the device's cores), judged against the budget.

    A speed-up criterion needs the unpruned model timed alongside, which a bundle does not hold:
    only the latency budget and the RAM ceiling are judged on the device."""
    slo, device = target.slo, timer.device
    threads = min(settings.get("threads", target.hardware.cores), device.cores)
    prompt = tuple(range(slo.prompt_tokens))  # llama-bench draws its own prompt tokens; only the count matters
    workload = Workload(prompt, slo.answer_tokens, threads, warmup=1, repetitions=repetitions,
                        settings=settings | {"threads": threads})
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
        "settings": workload.settings,
        "runtime": record.runtime,
        "benchmark": record.to_dict(),
    }


def write_back(bundle: Path, manifest: dict[str, Any], verification: dict[str, Any]) -> None:
    """Record the device's figures in report.json and its renderings, and their new hashes in the manifest.
    Each file is replaced whole (written aside, then renamed), the manifest last."""
    report_path = bundle / "report.json"
    report = json.loads(report_path.read_text())
    report.setdefault("verifications", []).append(verification)
    run_files = manifest.setdefault("run", {}).setdefault("files", {})
    renderings = {"report.json": json.dumps(report, indent=1), **render_reports(report), MANIFEST: None}
    for name, text in renderings.items():
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
                          runtime=runtime.name, bundle_runtime=toolchain.version)
    with _open_device(config, bundle, toolchain.arch) as dev:
        binaries = runtime.bundle_programs(bundle, toolchain.arch)
        result.answer = runtime.check_answer(dev, binaries, model, PROMPT, answer_tokens, threads)
        target = manifest.target
        if dev.emulated:
            result.slo_skipped = f"{dev.url} is emulated: its timings say nothing about the target's budget"
        elif target is None or target.hardware.arch != dev.arch:
            result.slo_skipped = f"{dev.url} is {dev.arch}, not the target's architecture"
        else:
            result.slo = _check_slo(runtime.runner(dev, binaries), model, target, manifest.settings, repetitions)
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
