"""The build's output directory: model, manifest.json, report.json, report.md — written atomically.

Everything is assembled in a temporary sibling directory and renamed into place when complete,
so a failed or interrupted build never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeprune import __version__
from edgeprune.config import Target
from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file
from edgeprune.models import Reference
from edgeprune.report import render_markdown
from edgeprune.runtimes import llamacpp
from edgeprune.search import SearchOutcome

MANIFEST = "manifest.json"


def check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise EdgepruneError(f"Output {path} exists and is not a directory; choose another -o/--output-dir.")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise EdgepruneError(f"Output directory {path} is not empty; pass --force to replace it or choose another.")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)


def tool_versions() -> dict[str, str]:
    versions = {"edgeprune": __version__, "python": platform.python_version(), "llama.cpp": llamacpp.version()}
    for dist in ("torch", "transformers", "gguf", "llama-cpp-python"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def model_filename(model_id: str, quant: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_id.split("(")[0].strip().split("/")[-1]).strip("-")
    return f"model-{slug or 'model'}-{quant}.gguf"


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of `out` to fill; it replaces `out` only if the block completes."""
    check_output_dir(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
    """mkdtemp (and some writers) create owner-only files; outputs get the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def write_output(out: Path, outcome: SearchOutcome, report: dict[str, Any], reference: Reference,
                 target: Target, force: bool) -> None:
    with staged_output(out, force) as tmp:
        selected = outcome.selected
        if selected is not None:
            name = model_filename(reference.source.model_id, report["profile"]["search"]["quant"])
            shutil.copyfile(selected.model, tmp / name)
            report["artifact"] = name
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(render_markdown(report))
        manifest = {
            "edgeprune_version": __version__,
            "created": report["created"],  # the only field that changes between identical builds
            "model": {"id": reference.source.model_id, "sha256": reference.sha256},
            "target": report["target"],
            "plan": selected.plan.to_dict() if selected else None,
            "budget_met": selected is not None,
            "tools": tool_versions(),
            "files": file_hashes(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
