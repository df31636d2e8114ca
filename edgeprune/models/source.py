"""Resolve `--model` into a typed source: embedded default, GGUF file, HF directory, or hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeprune.errors import EdgepruneError
from edgeprune.gguf_file import hparams, read_gguf
from edgeprune.hashing import sha256_file, sha256_tree
from edgeprune.models.embedded import MODEL_ID, embedded_gguf

# What a model directory's identity (and a hub download) covers: weights, config, tokenizer.
HF_FILES = (
    "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*.json", "tokenizer.model",
    "added_tokens.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
)
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
        return sha256_tree(self.local_dir(), HF_FILES)

    def local_dir(self) -> Path:
        """The HF directory on disk: the directory itself, or a hub id's snapshot (downloaded once)."""
        if self.kind == "hf_dir":
            return self.path
        if self.kind != "hub":
            raise ValueError(f"a {self.kind} source has no HF directory")
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.location, allow_patterns=list(HF_FILES)))


def resolve_source(model: str | None) -> ModelSource:
    if model is None:
        return ModelSource("embedded", str(embedded_gguf()), MODEL_ID)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise EdgepruneError(
                f"--model {model} is a file but not a .gguf; pass a GGUF file or a Hugging Face directory."
            )
        hparams(read_gguf(path))  # a broken or hostile header is one sentence now, before any work
        return ModelSource("gguf", str(path.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EdgepruneError(f"--model {model} has no config.json; pass a Hugging Face model directory.")
        if not any(path.glob("*.safetensors")):
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise EdgepruneError(
                    f"--model {model} has no .safetensors weights; edgeprune never loads pickled "
                    "checkpoints (.bin/.pt): convert them to safetensors first."
                )
            raise EdgepruneError(
                f"--model {model} has a config.json but no model weights (*.safetensors); "
                "pass the directory that holds the model's safetensors files."
            )
        return ModelSource("hf_dir", str(path.resolve()), path.resolve().name)
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return ModelSource("hub", model, model)
    raise EdgepruneError(
        f"--model {model} does not exist: pass a .gguf file, a Hugging Face directory, or a hub id (org/name)."
    )
