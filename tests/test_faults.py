"""Faults a build meets in the field, with the real components: concurrent caches, kills, ..."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_llama
from edgeprune.export import Provenance, export_gguf
from edgeprune.hashing import sha256_file

pytestmark = pytest.mark.slow


def _edgeprune(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeprune", *args]


def _tmp_dirs(root: Path) -> list[Path]:
    try:
        return list(root.rglob("*.tmp-*"))
    except FileNotFoundError:  # a directory renamed or removed under the walk
        return _tmp_dirs(root)


def _calibration_file(path: Path) -> Path:
    """Text for calibration (self-generating it with a random tiny model would take a minute here)."""
    sentences = [f"Pump {i} reported a pressure of {i * 7 % 90} bar at {i % 24}:00, within limits." for i in range(400)]
    path.write_text("\n".join(json.dumps({"text": " ".join(sentences[i : i + 8])}) for i in range(0, 400, 8)))
    return path


# --- concurrent cache: two builds share one cache directory at the same time --------------------------


def test_two_prunes_sharing_an_empty_cache_both_succeed_with_the_same_model(tmp_path, embedded_tokenizer_spec):
    """A GGUF source, so both first convert it into the torch reference (the step that used to end in
    "Directory not empty"), then build the same stages: one builds each, the other waits and reuses it."""
    source = tmp_path / "tiny.gguf"
    export_gguf(tiny_llama(tied=True), embedded_tokenizer_spec, source, "F32",
                Provenance("org/tiny", "ab" * 32, {}), "tiny")
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    cache, calib = tmp_path / "shared-cache", _calibration_file(tmp_path / "calib.jsonl")
    def prune(i: int) -> subprocess.Popen:
        args = ("prune", "--plan", str(plan), "-m", str(source), "-o", str(tmp_path / f"out{i}"), "--quant", "Q8_0",
                "--calib", str(calib), "-p", "quick", "--cache-dir", str(cache), "-q")
        return subprocess.Popen(_edgeprune(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [prune(0), prune(1)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    digests = {sha256_file(next((tmp_path / f"out{i}").glob("*.gguf"))) for i in range(2)}
    assert len(digests) == 1
    assert len([p for p in (cache / "reference").iterdir() if p.is_dir()]) == 1
    for stage in ("candidate-model", "quality"):
        assert len([p for p in (cache / "stages" / stage).iterdir() if p.is_dir()]) == 1, stage
    assert _tmp_dirs(cache) == []


# --- kill: SIGKILL at any moment, then the same command again ------------------------------------------


def _finished(stage_dir: Path) -> dict[str, int]:
    """Finished entries of a stage -> their result's mtime (a rebuilt entry would have a new one)."""
    if not stage_dir.is_dir():
        return {}
    return {p.name: (p / "result.json").stat().st_mtime_ns for p in stage_dir.iterdir()
            if ".tmp-" not in p.name and (p / "result.json").is_file()}


def test_a_build_killed_mid_search_resumes_from_its_finished_stages(tmp_path, embedded_reference):
    """`build` of a tiny HF model (the fastest realistic search), SIGKILLed while a stage of its third
    candidate is being written; the rerun reuses every finished stage, sweeps the killed build's
    temporary directories and ends as an uninterrupted build would."""
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(tied=False).save_pretrained(model_dir)
    embedded_reference.tokenizer.save_pretrained(model_dir)
    cache, out = tmp_path / "cache", tmp_path / "out"
    calib = _calibration_file(tmp_path / "calib.jsonl")
    # A speed-up a tiny model cannot reach (its output layer dominates): the search goes on.
    cmd = _edgeprune("build", "--target", "demo", "-m", str(model_dir), "--calib", str(calib), "-p", "quick",
                     "--speedup", "5", "-o", str(out), "--cache-dir", str(cache), "-q")
    candidates = cache / "stages" / "candidate-model"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while not (len(_finished(candidates)) >= 2 and _tmp_dirs(cache / "stages")):
            assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _tmp_dirs(cache / "stages"), "killed while writing a stage"
    before = {stage.name: _finished(stage) for stage in (cache / "stages").iterdir()}
    assert not out.exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode in (0, 1), rerun.stderr  # 1: the budget is not met, said in one sentence
    assert "Traceback" not in rerun.stderr
    report = json.loads((out / "report.json").read_text())
    after = {stage.name: _finished(stage) for stage in (cache / "stages").iterdir()}
    for stage, entries in before.items():
        assert entries.items() <= after[stage].items(), f"{stage}: a finished entry was rebuilt"
    # The importance scores came from the killed build: the rerun spent no time on them.
    assert "structured-importance" not in report["timings_s"]
    assert len(report["search"]["candidates"]) > len(before["candidate-model"])
    assert _tmp_dirs(cache) == [] and _tmp_dirs(tmp_path) == []
