"""The build's output directory, a deployable bundle — written atomically.

The model file (model-<name>-<quant>.gguf or .onnx), what the runtime puts beside it to run it on
the target (llama.cpp's: bin/, run.sh, serve.sh; ONNX Runtime's: python/, runner/, tokenizer.json,
run.sh, serve.sh), README.md (model card), report.json, report.md, report.html
and manifest.json (sha256 of every file). Everything is
assembled in a temporary sibling directory and renamed into place when complete, so a failed or
interrupted build never leaves a half-written output.

Rebuilding from the same inputs gives the same manifest except its `run` field: the timestamp
and the hashes of the files that carry measured timings (report.json, its renderings, README.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from edgeprune import __version__
from edgeprune.atomic import TMP_PREFIX, make_tmp, sweep
from edgeprune.config import SLO, Hardware, Target
from edgeprune.errors import EdgepruneError, naming_refusals
from edgeprune.hashing import sha256_file
from edgeprune.models import Reference
from edgeprune.report import render_reports
from edgeprune.runtimes.base import Runtime
from edgeprune.search import SearchOutcome
from edgeprune.signing import SIGNATURE_SUFFIX, sign_file
from edgeprune.versions import tool_versions

MANIFEST = "manifest.json"
SIGNATURE = MANIFEST + SIGNATURE_SUFFIX
# Files whose content depends on measured timings: rebuilding changes them, so the manifest keeps
# their hashes apart from the reproducible ones, in its `run` field.
MEASURED_FILES = ("README.md", "report.json", "report.md", "report.html")
MIB = 1 << 20


def check_output_dir(path: Path, force: bool, cache_dir: Path | None = None, model_dir: Path | None = None) -> None:
    """Refuse, before any work, an output directory that cannot be written or must not be replaced.

    The output is replaced whole at the end, so it may hold neither the current directory, the
    cache nor the source model; --force replaces only an empty directory or one that edgeprune wrote.
    """
    resolved = path.resolve()
    if path.name in ("", ".", "..") or resolved == resolved.parent:
        raise EdgepruneError(f"Output {path} names no directory of its own; give a new directory, e.g. -o out/model.")
    if Path.cwd().resolve().is_relative_to(resolved):
        raise EdgepruneError(f"Output {path} is the current directory or holds it, and the output directory is "
                             "replaced whole; give a new directory, e.g. -o out/model.")
    for label, kept in (("the cache directory", cache_dir), ("the model's directory", model_dir)):
        if kept is not None and kept.resolve().is_relative_to(resolved):
            raise EdgepruneError(f"Output {path} would replace {label} ({kept}); choose another -o/--output-dir.")
    if path.exists() and not path.is_dir():
        raise EdgepruneError(f"Output {path} exists and is not a directory; choose another -o/--output-dir.")
    if path.is_dir() and os.path.ismount(path):
        raise EdgepruneError(f"Output {path} is a mount point, which cannot be replaced; give a directory inside it.")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise EdgepruneError(f"Output directory {path} is not empty; pass --force to replace it or choose another.")
        foreign = _not_edgeprunes(path)
        if foreign:
            raise EdgepruneError(f"Output directory {path} {foreign}, and --force replaces only edgeprune's own "
                                 "outputs; empty it or choose another -o/--output-dir.")
    _check_writable(path, resolved.parent)


def _not_edgeprunes(path: Path) -> str | None:
    """Why `path` is not an output edgeprune wrote (its manifest.json lists every file but itself, its
    signature and an interrupted writer's leftovers), or None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or "edgeprune_version" not in manifest:
        return "was not written by edgeprune (it has no edgeprune manifest.json)"
    listed = {*manifest_hashes(manifest), MANIFEST, SIGNATURE}
    others = sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()
                    and str(p.relative_to(path)) not in listed and not p.name.startswith(TMP_PREFIX))
    return f"holds files edgeprune did not write ({', '.join(others[:3])})" if others else None


def _check_writable(path: Path, parent: Path) -> None:
    """The output's parent exists or can be created, and takes a new directory (probed: for root,
    only a real write tells a read-only mount)."""
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise EdgepruneError(f"Cannot create output {path}: {existing} is not a directory; choose another "
                             "-o/--output-dir.")
    try:
        Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=existing)).rmdir()
    except OSError as e:
        raise EdgepruneError(f"Cannot write output {path}: {existing} refuses new files ({e.strerror}); choose "
                             "another -o/--output-dir.") from None


def model_filename(model_id: str, quant: str, suffix: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_id.split("(")[0].strip().split("/")[-1]).strip("-")
    return f"model-{slug or 'model'}-{quant}{suffix}"


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of `out` to fill; it replaces `out` only if the block completes.
    A full or read-only disk is reported naming `out`; nothing half-written stays behind."""
    check_output_dir(out, force)
    with naming_refusals(out):
        sweep(out.parent, f".{out.name}")  # staging dirs of killed builds
        tmp = make_tmp(out.with_name(f".{out.name}"))
        try:
            yield tmp
            _default_permissions(tmp)
            if out.exists():
                _replace(out, tmp)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _replace(out: Path, new: Path) -> None:
    """Swap `new` in for the directory `out`. The old one moves onto an empty directory made for it
    (a name no one else uses, swept if this process dies), so nothing but `out` itself is ever removed."""
    old = make_tmp(out.with_name(f".{out.name}.old"))
    try:
        out.rename(old)
    except BaseException:
        old.rmdir()
        raise
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
                 target: Target, force: bool, runtime: Runtime, programs: Any = None,
                 sign_key: Path | None = None) -> None:
    """`programs`: what `runtime.target_programs` made for the target (None: a bundle without them)."""
    with staged_output(out, force) as tmp:
        selected = outcome.selected
        model = None
        if selected is not None:
            model = model_filename(reference.source.model_id, _quant(report), runtime.format.suffix)
            runtime.format.copy(selected.model, tmp / model)  # with the weights a format keeps beside it
            report["artifact"] = model
        settings = report.get("runtime_settings", {}).get("chosen", {})
        if model is not None and programs is not None:
            report["toolchain"] = runtime.package(tmp, model, target, programs, settings, reference.tokenizer)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        for name, text in render_reports(report).items():
            (tmp / name).write_text(text)
        if model is not None:
            card = runtime.card(programs) if programs is not None else []
            (tmp / "README.md").write_text(model_card(report, target, card))
        hashes = file_hashes(tmp)
        manifest = {
            "edgeprune_version": __version__,
            "runtime": runtime.name,
            "model": {"id": reference.source.model_id, "sha256": reference.sha256},
            "target": report["target"],
            "plan": selected.plan.to_dict() if selected else None,
            "budget_met": selected is not None,
            "tools": tool_versions(),
            "toolchain": report.get("toolchain"),
            "settings": settings,  # the runtime settings run.sh, serve.sh and verify's timing use
            "files": {k: v for k, v in hashes.items() if k not in MEASURED_FILES},
            # The only field that changes between builds of the same inputs.
            "run": {"created": report["created"], "files": {k: v for k, v in hashes.items() if k in MEASURED_FILES}},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if sign_key is not None:
            sign_manifest(tmp, sign_key)


def sign_manifest(bundle: Path, key: Path) -> Path:
    """manifest.json.sig: the manifest (the sha256 of every file) signed with an OpenSSH private key."""
    return sign_file(bundle / MANIFEST, key)


def _bundle_path(name: str) -> str:
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"{name!r} is not a plain relative path inside the bundle")
    return name


BundlePath = Annotated[str, AfterValidator(_bundle_path)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Open(BaseModel):
    # The manifest carries free-form records (plan, tools, ...): only the fields verify reads are checked.
    model_config = ConfigDict(extra="allow", frozen=True)


class ManifestRun(_Open):
    files: dict[BundlePath, Sha256] = {}


class ManifestToolchain(_Open):
    arch: str
    runtime_version: str | None = None  # what the bundle's programs run the model with
    llama_cpp: str | None = None  # llama.cpp's bundles before runtime_version

    @property
    def version(self) -> str:
        return self.runtime_version or self.llama_cpp or "unknown"


class ManifestTarget(_Open):
    name: str
    hardware: Hardware
    slo: SLO


class Manifest(_Open):
    """What `verify` reads of manifest.json."""

    runtime: str = "llama.cpp"  # what runs the model (bundles before the field had only llama.cpp)
    files: dict[BundlePath, Sha256]
    run: ManifestRun = ManifestRun()
    toolchain: ManifestToolchain | None = None
    target: ManifestTarget | None = None
    settings: dict[str, Any] = {}  # the runtime's, as the search chose them (bundles before: defaults)


def manifest_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file a bundle's manifest vouches for, reproducible and measured alike."""
    return manifest.get("files", {}) | manifest.get("run", {}).get("files", {})


def _quant(report: dict[str, Any]) -> str:
    """The shipped runtime's quantization (reports before the field: llama.cpp's, the profile's)."""
    return report["runtime"].get("quant") or report["profile"]["search"]["quant"]


def model_card(report: dict[str, Any], target: Target, programs: list[str]) -> str:
    """README.md of the bundle: what the model is, what was measured where, how to run it;
    `programs`: the runtime's lines about the programs it put in the bundle."""
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
        *([f"- Recovery: {sel['recovery']['description']} ({sel['recovery']['steps']} steps, "
           f"{sel['recovery']['tokens']:,} tokens), distilled toward the source model after pruning"]
          if sel.get("recovery") else []),
        f"- Quantization: {_quant(report)}, {size / MIB:.1f} MiB",
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
    lines += programs
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
