"""What the benchmark worker loads a model file with, by the file's suffix: an engine module's
`load(path, n_ctx, threads, settings)` returns an object that runs the SLO-shaped request
(`timed_generation(prompt, answer_tokens, tokens)`) in the worker's process and `close()`s.
A candidate and its baseline may be of different runtimes (an ONNX candidate timed against the
llama.cpp baseline): each file gets its own engine, and the two alternate in one process all the same.

Modules are named, not imported, so the worker loads only the runtimes its files need.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

ENGINES = {".gguf": "edgeprune.runtimes.llamacpp.engine", ".onnx": "edgeprune.runtimes.onnx.engine"}


def engine_module(path: Path) -> Any:
    """The module that loads `path` (`load(path, n_ctx, threads, settings)`, `version()`, `system_info()`)."""
    if path.suffix not in ENGINES:
        raise ValueError(f"{path.name}: no engine runs {path.suffix or 'suffix-less'} files "
                         f"(known: {', '.join(ENGINES)})")
    return importlib.import_module(ENGINES[path.suffix])
