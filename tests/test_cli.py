"""Bad input: one clear sentence, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest


def edgeprune(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True, cwd=cwd)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_targets_lists_and_shows():
    listing = edgeprune("targets")
    assert listing.returncode == 0
    assert "arm16g" in listing.stdout and "demo" in listing.stdout and "aarch64" in listing.stdout
    shown = edgeprune("targets", "show", "arm16g")
    assert shown.returncode == 0
    assert "latency_budget_s = 2.0" in shown.stdout


def test_unknown_target(tmp_path):
    assert_clean_error(edgeprune("build", "--target", "nope", "-o", str(tmp_path / "o")), "Unknown target 'nope'")
    assert not (tmp_path / "o").exists()


def test_missing_model_path(tmp_path):
    proc = edgeprune("build", "--target", "demo", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "does not exist")
    assert not (tmp_path / "o").exists()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    proc = edgeprune("build", "--target", "demo", "--model", str(model), "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "no .safetensors weights", "pickled")


def test_non_empty_output_needs_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(edgeprune("build", "--target", "demo", "-o", str(out)), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_budget_override(tmp_path):
    proc = edgeprune("build", "--target", "demo", "--speedup", "0.5", "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "Invalid budget override", "speedup")


def test_malformed_target_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('description = "x"\n[hardware]\narch = "aarch64"\n')
    assert_clean_error(edgeprune("build", "--target", str(bad), "-o", str(tmp_path / "o")), str(bad), "missing key")


@pytest.mark.slow
def test_calibration_file_too_short(tmp_path, cache_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("Only a few words here.")
    proc = edgeprune("build", "--target", "demo", "--calib", str(calib), "-o", str(tmp_path / "o"),
                     "--cache-dir", str(cache_dir), "-q")
    assert_clean_error(proc, "calib.txt has", "tokens but the profile needs")
    assert not (tmp_path / "o").exists()
