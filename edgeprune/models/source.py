"""Resolve `--model` into a typed source: embedded default, GGUF file, HF directory, or hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file, sha256_tree
from edgeprune.models.embedded import MODEL_ID, embedded_gguf

HF_FILES = ("config.json", "*.safetensors", "tokenizer*.json", "generation_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Kind = Literal["embedded", "gguf", "hf_dir", "hub"]


@dataclass(frozen=True)
class ModelSource:
    kind: Kind
    location: str  # a path, or a hub id
    model_id: str  # what reports call it

    @property
    def path(self) -> Path:
        return Path(self.location)

    def sha256(self) -> str:
        """Content hash of the weights and tokenizer (hub ids hash the downloaded snapshot)."""
        if self.kind in ("embedded", "gguf"):
            return sha256_file(self.path)
        if self.kind == "hf_dir":
            return sha256_tree(self.path, HF_FILES)
        from huggingface_hub import snapshot_download

        return sha256_tree(Path(snapshot_download(self.location, allow_patterns=list(HF_FILES))), HF_FILES)


def resolve_source(model: str | None) -> ModelSource:
    if model is None:
        return ModelSource("embedded", str(embedded_gguf()), MODEL_ID)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise EdgepruneError(
                f"--model {model} is a file but not a .gguf; pass a GGUF file or a Hugging Face directory."
            )
        return ModelSource("gguf", str(path.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EdgepruneError(f"--model {model} has no config.json; pass a Hugging Face model directory.")
        if not any(path.glob("*.safetensors")):
            raise EdgepruneError(
                f"--model {model} has no .safetensors weights; edgeprune never loads pickled "
                "checkpoints (.bin/.pt): convert them to safetensors first."
            )
        return ModelSource("hf_dir", str(path.resolve()), path.resolve().name)
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return ModelSource("hub", model, model)
    raise EdgepruneError(
        f"--model {model} does not exist: pass a .gguf file, a Hugging Face directory, or a hub id (org/name)."
    )
