"""Resolve `--model` into a typed source: embedded default, GGUF file, HF directory, or hub id."""

from __future__ import annotations

import json
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

    @property
    def directory(self) -> Path | None:
        """The directory the model lives in on this machine (a hub id's is the hub cache's business)."""
        if self.kind == "hub":
            return None
        return self.path if self.kind == "hf_dir" else self.path.parent

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
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            directory = Path(snapshot_download(self.location, allow_patterns=list(HF_FILES)))
        except RepositoryNotFoundError:
            raise EdgepruneError(f"--model {self.location}: no such model on the Hugging Face hub (or it is gated "
                                 "or private); check the id, or pass a local directory or .gguf file.") from None
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:  # offline, or the hub failed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgepruneError(f"--model {self.location} could not be downloaded from the Hugging Face hub "
                                 f"({reason}); check the network, or pass a local directory or .gguf file.") from None
        check_weight_index(directory, self.location)
        return directory


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
        check_weight_index(path, model)
        return ModelSource("hf_dir", str(path.resolve()), path.resolve().name)
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return ModelSource("hub", model, model)
    raise EdgepruneError(
        f"--model {model} does not exist: pass a .gguf file, a Hugging Face directory, or a hub id (org/name)."
    )


def check_weight_index(directory: Path, model: str) -> None:
    """A sharded checkpoint's model.safetensors.index.json must map tensor names to shard files."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except ValueError:  # not JSON, or not UTF-8
        data = None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise EdgepruneError(
            f"--model {model}: {index.name} is not a valid index (a JSON object whose \"weight_map\" maps tensor "
            "names to .safetensors files); restore it from the model's original files."
        )
