"""Faults of the machine rather than of the input: each ends in one sentence, exit 2, and nothing
half-written. Real file systems: small and read-only tmpfs mounts (the tests run as root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_cli import WITHOUT_DAC_OVERRIDE, assert_clean_error, edgeprune
from test_prune_cli import case_study_model

from conftest import calibration_text
from edgeprune.pipeline import MODEL_FILE

MIB = 1 << 20


@contextmanager
def tmpfs(path: Path, size: int, *options: str) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The case study's tiny Llama (GGUF about 8 MiB, HF checkpoint about 45 MiB), a --calib file and a
    plan that keeps one shape in every layer (so an HF checkpoint is written too)."""
    root = tmp_path_factory.mktemp("faults")
    calib, plan = root / "calib.txt", root / "plan.toml"
    calib.write_text(calibration_text())
    plan.write_text("drop_layers = [1]\n")
    return case_study_model(root / "llama-1024"), calib, plan


def _prune(model: tuple[Path, Path, Path], out: Path, cache: Path) -> subprocess.CompletedProcess:
    model_dir, calib, plan = model
    return edgeprune("prune", "--plan", str(plan), "--model", str(model_dir), "--calib", str(calib), "-p", "quick",
                     "--no-imatrix", "-q", "-o", str(out), "--cache-dir", str(cache))


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name or ".old" in p.name]


# -- disk full ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_output_on_a_full_disk(tmp_path, tiny_model):
    """Full while the GGUF is copied (4 MiB), then, with room for the GGUF alone, while the HF checkpoint
    is saved: one sentence naming the output, nothing left on the disk."""
    cache = tmp_path / "cache"
    with tmpfs(tmp_path / "disk", 4 * MIB) as disk:
        proc = _prune(tiny_model, disk / "out", cache)
        assert_clean_error(proc, f"No space left on device while writing {disk / 'out'}", "--output-dir")
        assert proc.returncode == 2 and os.listdir(disk) == []
    gguf_size = next(cache.rglob(MODEL_FILE)).stat().st_size
    assert gguf_size > 4 * MIB
    with tmpfs(tmp_path / "disk", gguf_size + MIB) as disk:
        proc = _prune(tiny_model, disk / "out", cache)
        assert_clean_error(proc, f"No space left on device while writing {disk / 'out'}")
        assert proc.returncode == 2 and os.listdir(disk) == []
    assert _leftovers(cache) == []


@pytest.mark.slow
def test_cache_on_a_full_disk(tmp_path, tiny_model):
    with tmpfs(tmp_path / "disk", 4 * MIB) as disk:
        proc = _prune(tiny_model, tmp_path / "out", disk)
        assert_clean_error(proc, f"No space left on device while writing {disk}", "--cache-dir")
        assert proc.returncode == 2 and not (tmp_path / "out").exists()
        assert _leftovers(disk) == []


# -- read-only ----------------------------------------------------------------------------------

@contextmanager
def read_only_bind(path: Path) -> Iterator[Path]:
    """`path` bind-mounted onto itself, then remounted read-only."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("mount", ["tmpfs", "bind"])
@pytest.mark.parametrize("command", ["prune", "build"])
def test_output_on_a_read_only_file_system_is_refused_before_any_work(tmp_path, mount, command):
    cache = tmp_path / "cache"
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    args = ["--plan", str(plan)] if command == "prune" else ["--target", "demo"]
    mounted = tmpfs(tmp_path / "ro", MIB, "ro") if mount == "tmpfs" else read_only_bind(tmp_path / "ro")
    with mounted as ro:
        for out in (ro / "out", ro / "deeper" / "out"):
            proc = edgeprune(command, *args, "-o", str(out), "--cache-dir", str(cache))
            assert_clean_error(proc, f"Cannot write output {out}", "Read-only file system")
            assert proc.returncode == 2
    assert not cache.exists()  # refused before the model was loaded or anything cached


def test_output_in_a_directory_without_write_permission(tmp_path):
    """What a non-root user meets (root without DAC override obeys the modes too)."""
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    proc = edgeprune("build", "--target", "demo", "-o", str(parent / "out"), "--cache-dir", str(tmp_path / "cache"),
                     prefix=WITHOUT_DAC_OVERRIDE)
    assert_clean_error(proc, f"Cannot write output {parent / 'out'}", "Permission denied")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_cache_on_a_read_only_file_system(tmp_path, tiny_model):
    with tmpfs(tmp_path / "ro", MIB, "ro") as ro:
        proc = _prune(tiny_model, tmp_path / "out", ro)
        assert_clean_error(proc, "Read-only file system", str(ro))
        assert proc.returncode == 2 and not (tmp_path / "out").exists()
