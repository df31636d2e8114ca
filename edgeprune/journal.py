"""A build's journal of device benchmarks, so that a killed build, run again, resumes.

Built candidates are already kept by the stage cache (stages.py): a rerun finds their files and
quality. Timings are not cached, since a later build must measure the machine as it is then; but
a build killed halfway should not time again what it had timed. So each benchmark a build takes is
appended to a journal named by everything the build depends on (`BuildConfig` without its output
options), flushed as it is written; a rerun of the same build replays the recorded benchmarks in
the order it asks for them (the search takes the same path on the same measurements) and times
only what comes after. A build that finishes, budget met or not, deletes its journal.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeprune.hashing import sha256_json
from edgeprune.measure import BenchmarkRecord

log = logging.getLogger(__name__)


class BenchmarkJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorded: dict[str, list[dict[str, Any]]] = {}
        self.used: Counter[str] = Counter()
        self.replayed = 0
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short
                    continue
                self.recorded.setdefault(entry["key"], []).append(entry["record"])

    @classmethod
    def for_build(cls, cache_dir: Path, identity: dict[str, Any]) -> BenchmarkJournal:
        name = sha256_json(identity)[:24]
        return cls(cache_dir / "journal" / f"{name}.jsonl")

    @property
    def pending(self) -> int:
        """Benchmarks recorded by a killed run of this build, not yet replayed."""
        return sum(len(v) for v in self.recorded.values()) - sum(self.used.values())

    def replay(self, key: str) -> BenchmarkRecord | None:
        """The next recorded benchmark for `key`, if the killed run took one."""
        n = self.used[key]
        records = self.recorded.get(key, [])
        if n >= len(records):
            return None
        self.used[key] += 1
        self.replayed += 1
        return BenchmarkRecord(**records[n])

    def record(self, key: str, record: BenchmarkRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "record": asdict(record)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.recorded.setdefault(key, []).append(asdict(record))
        self.used[key] += 1

    def finish(self) -> None:
        """The build is complete: nothing is left to resume."""
        self.path.unlink(missing_ok=True)
