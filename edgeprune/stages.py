"""Stages: steps with explicit inputs and outputs, cached by what they depend on.

A stage subclass names itself, states its identity (config + input hashes) and writes its
outputs into a directory. The runner keys that directory by a hash of the stage's name, its
identity, the code that makes it (`code_hash` of the stage's module: editing any edgeprune code
it can run rebuilds it, no version to bump by hand) and the tools' versions (llama.cpp, torch,
transformers, gguf). It builds the directory under a per-key lock and a temporary name
(`atomic`), so an interrupted build never leaves a half-written artifact, two builds sharing
a cache compute it once, and a repeated build reuses every finished one.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgeprune.atomic import build_once, discard, sweep
from edgeprune.errors import naming_refusals
from edgeprune.hashing import code_hash, sha256_json
from edgeprune.memory import return_freed_memory
from edgeprune.versions import tool_versions

log = logging.getLogger(__name__)
RESULT = "result.json"


class Stage(ABC):
    name: ClassVar[str]
    registry: ClassVar[dict[str, type[Stage]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in Stage.registry:
            raise TypeError(f"two stages are named {cls.name!r}")
        Stage.registry[cls.name] = cls

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything the outputs depend on (configs, input hashes), JSON-able."""

    @abstractmethod
    def run(self, out_dir: Path) -> dict[str, Any]:
        """Write outputs into `out_dir`; return a JSON-able result."""

    def key(self) -> str:
        return sha256_json({"stage": self.name, "code": code_hash(type(self).__module__), "tools": tool_versions(),
                            **self.identity()})[:24]


@dataclass
class StageOutput:
    dir: Path
    result: dict[str, Any]
    key: str
    cached: bool
    seconds: float


class StageRunner:
    def __init__(self, cache_root: Path) -> None:
        self.cache_root = cache_root
        self.timings: dict[str, float] = {}
        if cache_root.is_dir():
            for stage_dir in cache_root.iterdir():
                sweep(stage_dir)

    def cached(self, stage: Stage) -> StageOutput | None:
        """The stage's outputs if the cache holds them complete, else None (nothing is built)."""
        key = stage.key()
        final = self.cache_root / stage.name / key
        return StageOutput(final, _result(final), key, True, 0.0) if _complete(final) else None

    def run(self, stage: Stage) -> StageOutput:
        key = stage.key()
        final = self.cache_root / stage.name / key
        if not _complete(final):
            t0 = time.perf_counter()
            with naming_refusals(self.cache_root):  # a full cache disk is one sentence, not a traceback
                built = build_once(final, _complete, lambda tmp: _fill(stage, tmp))
            if built:
                seconds = time.perf_counter() - t0
                self.timings[stage.name] = self.timings.get(stage.name, 0.0) + seconds
                return StageOutput(final, _result(final), key, False, seconds)
            log.info("%s %s: built by another build meanwhile; reused", stage.name, key)
        log.debug("%s %s: cached", stage.name, key)
        return StageOutput(final, _result(final), key, True, 0.0)


    def discard(self, output: StageOutput) -> None:
        """Remove a stage's outputs from the cache (a later run builds them again): for big files
        that the rest of the build no longer needs."""
        discard(output.dir)
        log.debug("%s: removed from the cache", output.dir)


def _complete(entry: Path) -> bool:
    return (entry / RESULT).is_file()


def _result(entry: Path) -> dict[str, Any]:
    return json.loads((entry / RESULT).read_text())


def _fill(stage: Stage, tmp: Path) -> None:
    # What earlier stages freed goes back to the OS first: a stage's peak is its own work, not the
    # heap the previous one fragmented (parsed metadata, tokenizer files).
    gc.collect()
    return_freed_memory()
    (tmp / RESULT).write_text(json.dumps(stage.run(tmp), indent=1, sort_keys=True))
