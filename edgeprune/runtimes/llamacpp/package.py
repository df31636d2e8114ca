"""What a bundle holds to run a GGUF with llama.cpp on the target: llama.cpp's programs built for
it (bin/), run.sh and serve.sh, and the model card's lines about them."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any

from edgeprune import __version__
from edgeprune.config import Target
from edgeprune.runtimes.llamacpp.settings import LlamaSettings
from edgeprune.toolchain import TOOLS, Binaries

BIN = "bin"


def package(out: Path, model: str, target: Target, binaries: Binaries, settings: LlamaSettings) -> dict[str, Any]:
    (out / BIN).mkdir()
    for tool in TOOLS:
        shutil.copy2(binaries.path(tool), out / BIN / tool)
    _write_script(out / "run.sh", run_script(model, target, settings))
    _write_script(out / "serve.sh", serve_script(model, target, settings))
    return toolchain_summary(binaries)


def card(binaries: Binaries) -> list[str]:
    info = binaries.info
    return [f"`bin/` holds {', '.join(TOOLS)}: llama.cpp from {info['llama_cpp']}, built for {info['triple']} "
            f"with -march={info['cpu_flags']} by {info['compiler']}, statically linked.", ""]


def toolchain_summary(binaries: Binaries) -> dict[str, Any]:
    """What the manifest records of the binaries: how they were built, not how long it took."""
    keep = ("key", "triple", "arch", "cpu_flags", "llama_cpp", "llama_cpp_source_sha256", "compiler",
            "cmake_options", "toolchain_file")
    return {k: binaries.info[k] for k in keep} | {"runtime_version": binaries.info["llama_cpp"]}


def _describe(settings: LlamaSettings) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.to_dict().items())


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


_SCRIPT_HEAD = """#!/bin/sh
# {what}
# Built by edgeprune {version} for target {target} ({arch}); llama.cpp settings as the search chose them
# on the device ({settings}): options given after them override them.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
"""


def run_script(model: str, target: Target, settings: LlamaSettings) -> str:
    # llama-completion in single-turn chat mode prints just the answer on stdout (llama-cli, the
    # interactive chat, prints a banner there); llama.cpp's log goes to stderr.
    head = _SCRIPT_HEAD.format(
        what='One chat answer on stdout, then exit (the log goes to stderr). Usage: ./run.sh "your question" '
             "[llama-completion options]",
        version=__version__, target=target.name, arch=target.hardware.arch, settings=_describe(settings))
    options = shlex.join(settings.cli_args())
    return head + f"""if [ $# -lt 1 ]; then
  echo 'usage: ./run.sh "your question" [llama-completion options]' >&2
  exit 2
fi
question=$1
shift
exec "$here/bin/llama-completion" -m "$here/"{shlex.quote(model)} {options} -n {target.slo.answer_tokens} \\
  --conversation --single-turn --no-display-prompt --simple-io -p "$question" "$@"
"""


def serve_script(model: str, target: Target, settings: LlamaSettings) -> str:
    head = _SCRIPT_HEAD.format(
        what="llama-server (OpenAI-compatible HTTP API) on 127.0.0.1. Usage: ./serve.sh [PORT] [llama-server options]; "
             "add --host 0.0.0.0 to listen on every interface.",
        version=__version__, target=target.name, arch=target.hardware.arch, settings=_describe(settings))
    options = shlex.join(settings.cli_args())
    return head + f"""port=${{1:-8080}}
[ $# -gt 0 ] && shift
exec "$here/bin/llama-server" -m "$here/"{shlex.quote(model)} {options} --host 127.0.0.1 --port "$port" "$@"
"""
