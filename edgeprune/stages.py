"""Stages: steps with explicit inputs and outputs, cached by what they depend on.

A stage subclass names itself, states its identity (config + input hashes) and writes its
outputs into a directory. The runner keys that directory by a hash of (stage, version, identity),
builds it under a temporary name and renames it when complete, so an interrupted build never
leaves a half-written artifact and a repeated build reuses every finished one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgeprune import __version__
from edgeprune.errors import naming_refusals
from edgeprune.hashing import sha256_json

log = logging.getLogger(__name__)
RESULT = "result.json"


class Stage(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the outputs for the same identity change
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
        return sha256_json(
            {"stage": self.name, "version": self.version, "edgeprune": __version__, **self.identity()}
        )[:24]


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

    def run(self, stage: Stage) -> StageOutput:
        key = stage.key()
        final = self.cache_root / stage.name / key
        if (final / RESULT).is_file():
            log.debug("%s %s: cached", stage.name, key)
            return StageOutput(final, json.loads((final / RESULT).read_text()), key, True, 0.0)
        t0 = time.perf_counter()
        with naming_refusals(self.cache_root):  # a full cache disk is one sentence, not a traceback
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=final.parent))
            try:
                result = stage.run(tmp)
                (tmp / RESULT).write_text(json.dumps(result, indent=1, sort_keys=True))
                try:
                    tmp.rename(final)
                except OSError:  # another build finished the same artifact first
                    shutil.rmtree(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        seconds = time.perf_counter() - t0
        self.timings[stage.name] = self.timings.get(stage.name, 0.0) + seconds
        return StageOutput(final, result, key, False, seconds)
