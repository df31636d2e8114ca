"""The build's output directory, a deployable bundle — written atomically.

model-<name>-<quant>.gguf, bin/ (llama.cpp built for the target), run.sh, serve.sh, README.md
(model card), report.json, report.md and manifest.json (sha256 of every file). Everything is
assembled in a temporary sibling directory and renamed into place when complete, so a failed or
interrupted build never leaves a half-written output.

Rebuilding from the same inputs gives the same manifest except its `run` field: the timestamp
and the hashes of the files that carry measured timings (report.json, report.md, README.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeprune import __version__
from edgeprune.atomic_dirs import make_tmp, sweep
from edgeprune.config import Target
from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file
from edgeprune.models import Reference
from edgeprune.report import render_markdown
from edgeprune.search import SearchOutcome
from edgeprune.toolchain import TOOLS, Binaries
from edgeprune.versions import tool_versions

MANIFEST = "manifest.json"
# Files whose content depends on measured timings: rebuilding changes them, so the manifest keeps
# their hashes apart from the reproducible ones, in its `run` field.
MEASURED_FILES = ("README.md", "report.json", "report.md")
MIB = 1 << 20


def check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise EdgepruneError(f"Output {path} exists and is not a directory; choose another -o/--output-dir.")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise EdgepruneError(f"Output directory {path} is not empty; pass --force to replace it or choose another.")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)


def model_filename(model_id: str, quant: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_id.split("(")[0].strip().split("/")[-1]).strip("-")
    return f"model-{slug or 'model'}-{quant}.gguf"


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of `out` to fill; it replaces `out` only if the block completes."""
    check_output_dir(out, force)
    sweep(out.parent, f".{out.name}")  # staging dirs of killed builds
    tmp = make_tmp(out.with_name(f".{out.name}"))
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(root: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; outputs get the user's usual modes
    (executables stay executable)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        executable = p.is_dir() or p.stat().st_mode & 0o100
        p.chmod((0o777 if executable else 0o666) & ~umask)


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def write_output(out: Path, outcome: SearchOutcome, report: dict[str, Any], reference: Reference,
                 target: Target, force: bool, binaries: Binaries | None = None) -> None:
    with staged_output(out, force) as tmp:
        selected = outcome.selected
        model = None
        if selected is not None:
            model = model_filename(reference.source.model_id, report["profile"]["search"]["quant"])
            shutil.copyfile(selected.model, tmp / model)
            report["artifact"] = model
        if model is not None and binaries is not None:
            (tmp / "bin").mkdir()
            for tool in TOOLS:
                shutil.copy2(binaries.path(tool), tmp / "bin" / tool)
            _write_script(tmp / "run.sh", run_script(model, target))
            _write_script(tmp / "serve.sh", serve_script(model, target))
            report["toolchain"] = toolchain_summary(binaries)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(render_markdown(report))
        if model is not None:
            (tmp / "README.md").write_text(model_card(report, target, binaries))
        hashes = file_hashes(tmp)
        manifest = {
            "edgeprune_version": __version__,
            "model": {"id": reference.source.model_id, "sha256": reference.sha256},
            "target": report["target"],
            "plan": selected.plan.to_dict() if selected else None,
            "budget_met": selected is not None,
            "tools": tool_versions(),
            "toolchain": report.get("toolchain"),
            "files": {k: v for k, v in hashes.items() if k not in MEASURED_FILES},
            # The only field that changes between builds of the same inputs.
            "run": {"created": report["created"], "files": {k: v for k, v in hashes.items() if k in MEASURED_FILES}},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def manifest_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file a bundle's manifest vouches for, reproducible and measured alike."""
    return manifest.get("files", {}) | manifest.get("run", {}).get("files", {})


def toolchain_summary(binaries: Binaries) -> dict[str, Any]:
    """What the manifest records of the binaries: how they were built, not how long it took."""
    keep = ("key", "triple", "arch", "cpu_flags", "llama_cpp", "llama_cpp_source_sha256", "compiler",
            "cmake_options", "toolchain_file")
    return {k: binaries.info[k] for k in keep}


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


_SCRIPT_HEAD = """#!/bin/sh
# {what}
# Built by edgeprune {version} for target {target} ({arch}, {threads} threads).
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
"""


def run_script(model: str, target: Target) -> str:
    threads = target.hardware.cores
    # llama-completion in single-turn chat mode prints just the answer on stdout (llama-cli, the
    # interactive chat, prints a banner there); llama.cpp's log goes to stderr.
    head = _SCRIPT_HEAD.format(
        what='One chat answer on stdout, then exit (the log goes to stderr). Usage: ./run.sh "your question" '
             "[llama-completion options]",
        version=__version__, target=target.name, arch=target.hardware.arch, threads=threads)
    return head + f"""if [ $# -lt 1 ]; then
  echo 'usage: ./run.sh "your question" [llama-completion options]' >&2
  exit 2
fi
question=$1
shift
exec "$here/bin/llama-completion" -m "$here/"{shlex.quote(model)} -t {threads} -n {target.slo.answer_tokens} \\
  --conversation --single-turn --no-display-prompt --simple-io -p "$question" "$@"
"""


def serve_script(model: str, target: Target) -> str:
    threads = target.hardware.cores
    head = _SCRIPT_HEAD.format(
        what="llama-server (OpenAI-compatible HTTP API) on 127.0.0.1. Usage: ./serve.sh [PORT] [llama-server options]; "
             "add --host 0.0.0.0 to listen on every interface.",
        version=__version__, target=target.name, arch=target.hardware.arch, threads=threads)
    return head + f"""port=${{1:-8080}}
[ $# -gt 0 ] && shift
exec "$here/bin/llama-server" -m "$here/"{shlex.quote(model)} -t {threads} --host 127.0.0.1 --port "$port" "$@"
"""


def model_card(report: dict[str, Any], target: Target, binaries: Binaries | None) -> str:
    """README.md of the bundle: what the model is, what was measured where, how to run it."""
    sel = next(c for c in report["search"]["candidates"] if c["selected"])
    model, device, slo = report["model"], report["device"], target.slo
    hw = target.hardware
    size = sel["size_bytes"]
    # Decoding is bound by memory bandwidth: each token reads every weight once.
    est_decode = hw.memory_bandwidth_gbs * 1e9 / size
    lines = [
        f"# {report['artifact']}",
        "",
        f"{model['id']} pruned and quantized by edgeprune {report['edgeprune_version']} for target "
        f"`{target.name}`: {target.description}",
        "",
        "## Model",
        "",
        f"- Source: {model['id']} ({model['source']}), sha256 `{model['sha256']}`, {model['parameters']:,} parameters",
        f"- Pruning: {sel['step']}; plan `{json.dumps(sel['plan'], sort_keys=True)}`",
        f"- Quantization: {report['profile']['search']['quant']}, {size / MIB:.1f} MiB",
        f"- Quality against the source model (held-out text): mean KLD {sel['mean_kld']:.3f}, top-1 agreement "
        f"{sel['top1_agreement'] * 100:.1f}%, perplexity {sel['perplexity']:.2f} "
        f"(source {report['calibration']['reference_perplexity']:.2f})",
        "",
        "## Figures",
        "",
        f"Workload: {slo.prompt_tokens}-token prompt, {slo.answer_tokens}-token answer; budget: "
        f"{report['search']['budget']['description']}.",
        "",
        f"- Measured on `{device['url']}` ({device['arch']}): p50 {sel['latency_p50_s']:.3f} s, "
        f"p90 {sel['latency_p90_s']:.3f} s, decode {sel['decode_tok_s']:.0f} tok/s, prefill "
        f"{sel['prefill_tok_s']:.0f} tok/s, peak RSS {sel['peak_rss_bytes'] / MIB:.0f} MiB.",
    ]
    if device["is_target_arch"]:
        lines.append(f"- {device['url']} has the target's architecture; the figures above are the verdict.")
    else:
        lines.append(
            f"- **Not measured on the target.** {device['url']} is a stand-in ({device['arch']}) for the "
            f"{hw.arch} target; the figures above are that machine's. Run `edgeprune verify` on the device."
        )
    est = sel.get("estimate_on_target")
    if est:
        lines.append(
            f"- Estimated on the target (roofline fitted to this build's measurements, with the target's "
            f"{hw.memory_bandwidth_gbs:g} GB/s): TTFT {est['ttft_s'] * 1000:.0f} ms, decode {est['decode_tok_s']:.0f} "
            f"tok/s, {est['latency_s']:.3f} s end to end. An estimate, not a measurement.")
    lines += [
        f"- Bound on the target: at most {est_decode:.0f} tok/s decode ({hw.memory_bandwidth_gbs:g} GB/s memory "
        f"bandwidth / {size / MIB:.1f} MiB of weights read per token).",
        "",
        "Every candidate the search measured is in report.md / report.json.",
        "",
        "## Run it",
        "",
        "Copy this directory to the device; nothing else needs to be installed.",
        "",
        "```sh",
        './run.sh "What is the capital of France?"   # one answer, then exit',
        "./serve.sh 8080                             # HTTP API on 127.0.0.1:8080",
        "```",
        "",
    ]
    if binaries is not None:
        info = binaries.info
        lines += [
            f"`bin/` holds {', '.join(TOOLS)}: llama.cpp from {info['llama_cpp']}, built for {info['triple']} "
            f"with -march={info['cpu_flags']} by {info['compiler']}, statically linked.",
            "",
        ]
    lines += [
        "Check the bundle (checksums, then the binaries generate on the device and must match the host):",
        "",
        "```sh",
        f"edgeprune verify . --device {'qemu-aarch64' if hw.arch == 'aarch64' else 'local'}",
        "```",
        "",
        "`manifest.json` lists the sha256 of every file.",
        "",
    ]
    return "\n".join(lines)
