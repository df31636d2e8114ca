"""Small hand-made bundles (a manifest listing a couple of files) and SSH key pairs for the verify tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from edgeprune.hashing import sha256_file


def make_bundle(path: Path, files: dict[str, bytes] | None = None, **fields: Any) -> Path:
    """A bundle whose manifest vouches for `files`; no binaries (toolchain null) unless `fields` say so."""
    files = files if files is not None else {"model-x-Q4_K_M.gguf": b"GGUF not really", "README.md": b"# card\n"}
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    manifest = {"edgeprune_version": "test", "toolchain": None, "plan": {"free": "form"},
                "files": {name: sha256_file(path / name) for name in files}, "run": {"files": {}}} | fields
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def ssh_keypair(directory: Path, name: str = "key", passphrase: str = "") -> tuple[Path, Path]:
    """A fresh ed25519 key pair: (private key, public key)."""
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", name, "-f", str(key)], check=True)
    return key, key.with_name(name + ".pub")
