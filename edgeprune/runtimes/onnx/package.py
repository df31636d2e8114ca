"""What a bundle holds to run an ONNX model with ONNX Runtime on the target: the device's own Python
with onnxruntime (python/, device_python.py), the program that answers with it (runner/, runner.py)
and the tokenizer, run.sh and serve.sh, and the model card's lines about them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeprune import __version__
from edgeprune.config import Target
from edgeprune.runtimes.onnx import debian, device_python, runner
from edgeprune.runtimes.onnx.device_python import DevicePython

PYTHON_DIR = "python"
RUNNER_DIR = "runner"
TOKENIZER = "tokenizer.json"


def python_command(arch: str, at: str) -> list[str]:
    """The bundle's Python, for a bundle at `at` (a path, or a shell expression), isolated and
    writing no bytecode into the bundle (verify would find files the manifest does not list)."""
    return [*device_python.command(arch, f"{at}/{PYTHON_DIR}"), "-I", "-B"]


def runner_command(arch: str, at: str) -> list[str]:
    return [*python_command(arch, at), f"{at}/{RUNNER_DIR}", f"{at}/{RUNNER_DIR}/{runner.CONFIG}"]


def package(out: Path, model: str, target: Target, python: DevicePython, threads: int,
            tokenizer: Any) -> dict[str, Any]:
    shutil.copytree(python.root, out / PYTHON_DIR, ignore=shutil.ignore_patterns(device_python.MADE))
    tokenizer.backend_tokenizer.save(str(out / TOKENIZER))
    stop = sorted({t for t in (tokenizer.eos_token_id,) if t is not None})
    runner.install(out / RUNNER_DIR, {"model": f"../{model}", "tokenizer": f"../{TOKENIZER}",
                                      "chat": runner.chat_format(tokenizer), "stop": stop,
                                      "answer_tokens": target.slo.answer_tokens, "threads": threads})
    describe = f"threads {threads}"
    _write_script(out / "run.sh", _script(
        target, describe, 'One chat answer on stdout, then exit. Usage: ./run.sh "your question" [--system TEXT] '
        "[-n TOKENS] [-t THREADS] [--temp T --top-p P --seed S] [--tokens]",
        'if [ $# -lt 1 ]; then\n  echo \'usage: ./run.sh "your question" [options; --help lists them]\' >&2\n'
        "  exit 2\nfi\n", ""))
    _write_script(out / "serve.sh", _script(
        target, describe, "An OpenAI-style HTTP API (single-turn chats) on 127.0.0.1. Usage: ./serve.sh [PORT] "
        "[--host 0.0.0.0] [--context TOKENS]",
        'port=${1:-8080}\n[ $# -gt 0 ] && shift\n', ' --serve --port "$port"'))
    return summary(python, target.hardware.arch)


def summary(python: DevicePython, arch: str) -> dict[str, Any]:
    """What the manifest records of the bundle's programs."""
    return {"arch": arch, "runtime_version": f"onnxruntime {python.versions['onnxruntime']}",
            "python": python.versions, "assembled": python.root.name,
            "debian": {"release": debian.RELEASE, "arch": device_python.ARCHES[arch].debian}}


def card(python: DevicePython) -> list[str]:
    v = python.versions
    return [f"`{PYTHON_DIR}/` holds the Python the model runs on: CPython {v['python']} and the C libraries under "
            f"it (glibc included) from Debian {debian.RELEASE}'s {device_python.ARCHES[python.arch].debian} "
            f"packages, with onnxruntime {v['onnxruntime']}, numpy {v['numpy']} and tokenizers {v['tokenizers']}, "
            f"started through its own dynamic loader: the device needs Linux on {python.arch}, nothing else. "
            f"`{RUNNER_DIR}/` holds the program that answers (chats are single-turn: the chat template is rendered "
            "around the system message and the question when the bundle is made).", ""]


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _script(target: Target, settings: str, what: str, head: str, options: str) -> str:
    command = " ".join(f'"{part}"' for part in runner_command(target.hardware.arch, "$here"))
    return f"""#!/bin/sh
# {what}
# Built by edgeprune {__version__} for target {target.name} ({target.hardware.arch}); ONNX Runtime settings as the
# search chose them on the device ({settings}): options given after them override them.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
{head}exec {command}{options} "$@"
"""
