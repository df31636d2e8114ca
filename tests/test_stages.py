"""The artifact cache: what a stage's key holds (recipe contents, tool versions, the code), and the
runner's temporary directories. Concurrent and killed builds: tests/test_faults.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeprune.atomic import make_tmp, sweep
from edgeprune.config import CalibrationSettings
from edgeprune.data import TextSplits
from edgeprune.hashing import PACKAGE_ROOT, code_hash, code_modules
from edgeprune.models import Reference
from edgeprune.models.source import ModelSource
from edgeprune.pipeline import CandidateModel, SelfCalibration
from edgeprune.prune import Plan
from edgeprune.quantize import RECIPES, QuantSpec, Recipe
from edgeprune.runtimes import llamacpp
from edgeprune.stages import Stage, StageRunner
from edgeprune.versions import _tool_versions

HF_SOURCE = ModelSource("hf_dir", "/models/tiny", "tiny")
REFERENCE = Reference(weights=None, tokenizer=None, tokenizer_spec=None, source=HF_SOURCE, sha256="ab" * 32)
SPLITS = TextSplits(calib=torch.zeros(1, 4, dtype=torch.long), heldout=torch.zeros(1, 4, dtype=torch.long),
                    source="test", sha256="cd" * 32)


CALIBRATION = CalibrationSettings(samples=8, heldout_samples=4, seq_len=96, seed=0)


def _candidate(recipe: str = "default") -> CandidateModel:
    return CandidateModel(REFERENCE, Plan(drop_layers=(1,)), QuantSpec("Q4_K_M", recipe), SPLITS, threads=2)


def test_a_recipe_redefined_under_the_same_name_changes_the_candidate_key(monkeypatch):
    before = _candidate("q4_0-narrow").key()
    assert _candidate("q4_0-narrow").key() == before
    monkeypatch.setitem(RECIPES, "q4_0-narrow", Recipe("q4_0-narrow", "same name, other rules", narrow="Q5_0"))
    assert _candidate("q4_0-narrow").key() != before
    # The description is not a rule: rewording it keeps the artifact.
    monkeypatch.setitem(RECIPES, "q4_0-narrow", Recipe("q4_0-narrow", "reworded", narrow="Q4_0"))
    assert _candidate("q4_0-narrow").key() == before


def test_the_key_changes_with_the_llama_cpp_version(monkeypatch):
    before = _candidate().key()
    monkeypatch.setattr(llamacpp, "version", lambda: "llama-cpp-python 9.9.9 (llama.cpp 99999)")
    _tool_versions.cache_clear()
    try:
        assert _candidate().key() != before
    finally:
        monkeypatch.undo()
        _tool_versions.cache_clear()
    assert _candidate().key() == before


def _copy_package(dest: Path) -> Path:
    shutil.copytree(PACKAGE_ROOT / "edgeprune", dest / "edgeprune", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_code_hash_follows_the_modules_a_stage_can_run(tmp_path):
    root = _copy_package(tmp_path)
    modules = code_modules("edgeprune.pipeline", root)
    # Imported transitively, a parent package, and a worker named only in a string (`python -m ...`).
    assert {"edgeprune.prune.apply", "edgeprune.quantize", "edgeprune"} <= set(modules)
    assert "edgeprune.runtimes.bench_worker" in code_modules("edgeprune.runtimes.llamacpp.runtime", root)
    assert "edgeprune.cli" not in modules and "edgeprune.bundle" not in modules
    # Where a model is timed is no part of how it was made: no device, no runtime registry.
    assert not [m for m in modules if m.startswith("edgeprune.devices")]
    assert "edgeprune.runtimes.registry" not in modules
    (root / "edgeprune" / "prune" / "relative.py").write_text("from .apply import apply_plan\nfrom .. import errors\n")
    assert {"edgeprune.prune.apply", "edgeprune.errors"} <= set(code_modules("edgeprune.prune.relative", root))

    before = code_hash("edgeprune.pipeline", root)
    assert before == code_hash("edgeprune.pipeline")  # same sources, same hash wherever they are
    for unrelated in ("cli.py", "devices/ssh.py", "runtimes/registry.py"):
        with open(root / "edgeprune" / unrelated, "a") as f:
            f.write("\n# unrelated to any artifact\n")
    assert code_hash.__wrapped__("edgeprune.pipeline", root) == before
    with open(root / "edgeprune" / "prune" / "apply.py", "a") as f:
        f.write("\n# the pruning code changed\n")
    assert code_hash.__wrapped__("edgeprune.pipeline", root) != before


@pytest.mark.slow
def test_editing_a_stages_code_changes_its_key(tmp_path):
    """Without a version to bump: the same stage, keyed by two copies of the package that differ in a
    module it runs (each in its own interpreter, as two edgeprune versions would be)."""
    script = ("from edgeprune.config import CalibrationSettings; from edgeprune.models import Reference; "
              "from edgeprune.models.source import ModelSource; from edgeprune.pipeline import SelfCalibration; "
              f"r = Reference(None, None, None, ModelSource('hf_dir', '/models/tiny', 'tiny'), {'ab' * 32!r}); "
              f"print(SelfCalibration(r, CalibrationSettings(**{CALIBRATION.model_dump()!r}), 2).key())")

    def key(root: Path) -> str:
        env = os.environ | {"PYTHONPATH": str(root)}
        proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    original = _copy_package(tmp_path / "a")
    edited = _copy_package(tmp_path / "b")
    with open(edited / "edgeprune" / "data.py", "a") as f:
        f.write("\n# the calibration sampler changed\n")
    assert key(original) == SelfCalibration(REFERENCE, CALIBRATION, 2).key()
    assert key(edited) != key(original)


def test_self_calibration_is_keyed_by_the_quick_copy_it_samples_from_not_the_thread_count(monkeypatch):
    """By the quick copy's stage key, which fixes its bytes, so a cached sample needs no copy built."""
    import edgeprune.pipeline as pipeline

    key = SelfCalibration(REFERENCE, CALIBRATION, threads=2).key()
    assert SelfCalibration(REFERENCE, CALIBRATION, threads=1).key() == key
    monkeypatch.setattr(pipeline, "QUICK_QUANT", "Q8_0")  # another quick copy
    assert SelfCalibration(REFERENCE, CALIBRATION, threads=2).key() != key
    # A GGUF source samples from itself, covered by the reference's hash.
    gguf = Reference(None, None, None, ModelSource("gguf", "/models/m.gguf", "m"), "ab" * 32)
    assert SelfCalibration(gguf, CALIBRATION, 2).generator is None


def test_a_discarded_entry_is_gone_whole_and_rebuilt_by_the_next_run(tmp_path):
    Counted.runs = 0
    runner = StageRunner(tmp_path)
    first = runner.run(Counted())
    assert runner.cached(Counted()).dir == first.dir
    runner.discard(first)
    assert not first.dir.exists() and runner.cached(Counted()) is None
    assert list((tmp_path / Counted.name).iterdir()) == [first.dir.with_name(first.dir.name + ".lock")]
    again = runner.run(Counted())
    assert again.dir == first.dir and not again.cached and again.result == {"n": 2}
    runner.discard(again)
    runner.discard(again)  # already gone: nothing to do


class Counted(Stage):
    name = "test-counted"
    runs = 0

    def identity(self):
        return {}

    def run(self, out_dir):
        Counted.runs += 1
        (out_dir / "x").write_text("x")
        return {"n": Counted.runs}


def test_runner_builds_once_and_replaces_an_incomplete_entry(tmp_path):
    Counted.runs = 0
    runner = StageRunner(tmp_path)
    first = runner.run(Counted())
    assert not first.cached and first.result == {"n": 1} and (first.dir / "x").is_file()
    again = runner.run(Counted())
    assert again.cached and again.result == {"n": 1} and Counted.runs == 1
    # An entry without its result (damaged by hand) is rebuilt, not renamed onto ("directory not empty").
    (first.dir / "result.json").unlink()
    rebuilt = runner.run(Counted())
    assert not rebuilt.cached and json.loads((rebuilt.dir / "result.json").read_text()) == {"n": 2}
    assert [p.name for p in (tmp_path / Counted.name).iterdir() if ".tmp-" in p.name] == []


def test_sweep_removes_only_the_temporary_dirs_of_dead_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        final = tmp_path / "entry"
        mine = make_tmp(final)
        theirs = tmp_path / f"entry.tmp-{live.pid}-abc123"
        killed = tmp_path / f"entry.tmp-{dead.pid}-abc123"
        unowned = tmp_path / "entry.tmp-k3j4h5g6"  # written before the pid was recorded
        other = tmp_path / f"other.tmp-{dead.pid}-abc123"
        host = os.uname().nodename
        killed_here = tmp_path / f"entry.tmp-{host}@{dead.pid}-abc123"
        # A cache shared by several machines: another's pid cannot be checked from here, so it is left.
        elsewhere = tmp_path / f"entry.tmp-another-node.example@{dead.pid}-abc123"
        for d in (theirs, killed, unowned, other, killed_here, elsewhere):
            d.mkdir()
        assert mine.name.startswith(f"entry.tmp-{host}@{os.getpid()}-")
        assert sweep(tmp_path, "entry") == 3
        assert mine.is_dir() and theirs.is_dir() and other.is_dir() and elsewhere.is_dir()
        assert not killed.exists() and not unowned.exists() and not killed_here.exists()
    finally:
        live.kill()
        live.wait()
