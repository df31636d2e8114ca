"""Content hashes: the keys of the artifact cache (data and the code that made it) and the checksums of
the manifest."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
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


PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory holding the edgeprune package
_MODULE_NAME = re.compile(r"edgeprune(\.\w+)*")


@functools.cache
def code_hash(module: str, root: Path = PACKAGE_ROOT) -> str:
    """Hash of the source of `module` and of every edgeprune module it can run (`code_modules`).
    Cache keys hold it, so editing any code an artifact came from rebuilds it, and editing unrelated
    code (the CLI, reports) does not."""
    return sha256_json({name: sha256_file(path) for name, path in sorted(code_modules(module, root).items())})


def code_modules(module: str, root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """`module` and the edgeprune modules it imports, read statically and transitively (function-level
    imports too), their parent packages, and modules named in strings (a `python -m edgeprune.x`
    worker): a superset of the code it runs."""
    files: dict[str, Path] = {}
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or not _MODULE_NAME.fullmatch(name):
            continue
        seen.add(name)
        path = _module_file(name, root)
        if path is None:  # a name imported from a package (`from edgeprune.x import Y`), not a module
            continue
        files[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _referenced_modules(path, name)
    return files


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _referenced_modules(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            found.add(node.value)
    return found
