"""`edgeprune verify BUNDLE --device D`: is this bundle intact, and does it run on the device?

1. Every file's sha256 against manifest.json (and no file the manifest does not know). A bundle
   that fails here is not executed: its binaries may be the tampered files.
2. The bundle's own binaries run on the device: every tool starts, and llama-completion loads
   the model and answers a fixed prompt greedily. The answer must equal the host's, computed by
   llama-cpp-python (the same llama.cpp source) on the same GGUF.

Devices: `local` (this machine, whose architecture must be the bundle's) and `qemu-aarch64`
(an aarch64 bundle under user-mode emulation). `ssh://` devices come with the SSH device support.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.bundle import MANIFEST, manifest_hashes
from edgeprune.devices import host_arch
from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file
from edgeprune.runtimes import llamacpp
from edgeprune.toolchain import TOOLS

log = logging.getLogger(__name__)

PROMPT = "The three primary colours of light are"
ANSWER_TOKENS = 16
TIMEOUT_S = 1800  # an emulated answer runs at a few tokens/s
QEMU = {"qemu-aarch64": ("aarch64", "/usr/aarch64-linux-gnu")}
DEVICES = ("local", *QEMU)
_EVAL = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second")
_PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens.*?([\d.]+) tokens per second")
_END_OF_TEXT = " [end of text]\n"


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
    host_llama_cpp: str = ""
    bundle_llama_cpp: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"bundle": str(self.bundle)}


def parse_device(device: str) -> str:
    if device.startswith("ssh://"):
        raise EdgepruneError(
            f"SSH devices are not available yet ({device}); verify with --device qemu-aarch64, or copy the bundle "
            "to the device and run `edgeprune verify BUNDLE --device local` there."
        )
    if device not in DEVICES:
        raise EdgepruneError(f"Unknown device '{device}': verify runs on {', '.join(DEVICES)}.")
    return device


def default_device(arch: str) -> str:
    """The bundle's own architecture here if the host has it, else its emulator."""
    if arch == host_arch():
        return "local"
    return next((name for name, (qarch, _) in QEMU.items() if qarch == arch), "local")


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


def _runner(device: str, arch: str) -> list[str]:
    """The command prefix that runs one of the bundle's binaries on the device."""
    if device == "local":
        if arch != host_arch():
            raise EdgepruneError(
                f"The bundle is built for {arch} and this machine is {host_arch()}: verify it with --device "
                f"{default_device(arch)} or on an {arch} device."
            )
        return []
    qarch, sysroot = QEMU[device]
    if arch != qarch:
        raise EdgepruneError(f"The bundle is built for {arch}; {device} runs {qarch} binaries only.")
    if shutil.which(device) is None:
        raise EdgepruneError(f"{device} is not installed: install the Debian package qemu-user (apt-get install "
                             "qemu-user).")
    # The binaries are static; the sysroot serves a dynamically linked build, if one is ever shipped.
    return [device, "-L", sysroot] if Path(sysroot).is_dir() else [device]


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VerificationFailed(f"{what} did not finish within {TIMEOUT_S} s on the device.") from None
    except OSError as e:
        raise VerificationFailed(f"{what} could not start on the device: {e}.") from None
    if proc.returncode != 0:
        tail = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise VerificationFailed(f"{what} failed on the device (exit {proc.returncode}): {tail}")
    return proc


def host_answer(model: Path, prompt: str, answer_tokens: int, threads: int) -> tuple[list[int], str]:
    """Greedy tokens and their text as llama-completion prints them, from llama-cpp-python."""
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


def verify(bundle: Path, device: str | None = None, answer_tokens: int = ANSWER_TOKENS,
           threads: int = 2) -> VerifyResult:
    t0 = time.perf_counter()
    if device is not None:
        parse_device(device)
    manifest = read_manifest(bundle)
    toolchain = manifest.get("toolchain")
    n_files = check_files(bundle, manifest)
    if not toolchain:
        raise EdgepruneError(f"Bundle {bundle} holds no binaries (its build met no budget, or predates them); "
                             "nothing to run on a device.")
    arch = toolchain["arch"]
    device = device or default_device(arch)
    result = VerifyResult(bundle, device, arch, files_checked=n_files, host_llama_cpp=llamacpp.version(),
                          bundle_llama_cpp=toolchain["llama_cpp"])
    prefix = _runner(device, arch)
    models = sorted(name for name in manifest["files"] if name.endswith(".gguf") and "/" not in name)
    if len(models) != 1:
        raise VerificationFailed(f"Bundle {bundle} should hold one model at its top level, found {len(models)}.")
    model = bundle / models[0]

    for tool in TOOLS:
        flag = "--help" if tool == "llama-bench" else "--version"
        proc = _run([*prefix, str(bundle / "bin" / tool), flag], f"{tool} {flag}")
        out = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
        result.tools[tool] = out[0] if out else ""

    log.info("generating %d tokens with the bundle's llama-completion on %s", answer_tokens, device)
    t1 = time.perf_counter()
    proc = _run([*prefix, str(bundle / "bin" / "llama-completion"), "-m", str(model), "-p", PROMPT,
                 "-n", str(answer_tokens), "--temp", "0", "--seed", "0", "-t", str(threads),
                 "-c", str(answer_tokens + 256), "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup"],
                "llama-completion")
    result.device_seconds = time.perf_counter() - t1
    text = proc.stdout.decode("utf-8", errors="replace")
    # llama-completion ends its output with " [end of text]\n" after an end-of-generation token, then "\n\n".
    result.device_text = text.removesuffix("\n\n").removesuffix(_END_OF_TEXT)
    stderr = proc.stderr.decode(errors="replace")
    if m := _EVAL.search(stderr):
        result.device_decode_runs = int(m.group(2))
        result.device_decode_tok_s = float(m.group(3))
    if m := _PROMPT_EVAL.search(stderr):
        result.device_prefill_tok_s = float(m.group(3))

    result.host_tokens, result.host_text = host_answer(model, PROMPT, answer_tokens, threads)
    result.seconds = time.perf_counter() - t0
    if result.device_text != result.host_text:
        raise VerificationFailed(
            f"{models[0]}: the device's greedy answer differs from the host's (device {result.device_text!r}, "
            f"host {result.host_text!r}); the binaries or the model do not run correctly on {device}."
        )
    # Same text; a full-length answer must also be the same number of tokens (the last one is
    # sampled, not evaluated), which equal text alone would not prove.
    full = len(result.host_tokens) == answer_tokens
    if full and result.device_decode_runs is not None and result.device_decode_runs != answer_tokens - 1:
        raise VerificationFailed(
            f"{models[0]}: the device evaluated {result.device_decode_runs} answer tokens, the host "
            f"{answer_tokens - 1}, for the same text; the binaries do not run correctly on {device}."
        )
    return result
