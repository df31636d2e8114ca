"""Content hashes: the keys of the artifact cache and the checksums of the manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of dict ordering."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def sha256_tree(root: Path, patterns: tuple[str, ...]) -> str:
    """Hash of the files in `root` matching `patterns`, by relative path and content."""
    files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    return sha256_json({str(p.relative_to(root)): sha256_file(p) for p in files})
