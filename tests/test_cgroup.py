"""Memory-capped runs (edgeprune.cgroup) and the process-tree memory sampler (edgeprune.memory)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprune.cgroup import run_limited, unavailable_reason
from edgeprune.memory import TreeSampler, evict_page_cache, process_tree, tree_memory

MIB = 1 << 20


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _allocate(mib: int, then: str = "") -> list[str]:
    # b"\1" * n writes every page (bytearray(n) may get untouched zero pages from calloc).
    return _python(f"import sys, time\nb = b'\\1' * ({mib} << 20)\n{then}")


@pytest.fixture(scope="module")
def memory_cgroup() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


def test_a_child_allocating_over_the_limit_is_oom_killed(memory_cgroup):
    run = run_limited(_allocate(256), 96 * MIB, stderr=subprocess.DEVNULL)
    assert run.oom_killed and run.oom_kills >= 1
    assert run.returncode != 0
    assert run.max_usage_bytes is not None and run.max_usage_bytes <= 96 * MIB


def test_a_child_below_the_limit_passes_and_its_peak_is_seen(memory_cgroup):
    run = run_limited(_allocate(64, "time.sleep(0.6)"), 256 * MIB, period_s=0.05)
    assert run.returncode == 0 and not run.oom_killed
    assert run.peak_anon_bytes >= 64 * MIB  # sampled over the tree
    assert run.max_usage_bytes >= 64 * MIB  # the kernel's own peak charge
    assert run.limit_bytes == 256 * MIB and run.cgroup_version in (1, 2)


def test_page_cache_of_a_mapped_file_read_under_a_small_limit_does_not_kill(memory_cgroup, tmp_path):
    """Memory-mapped weights larger than the limit are fine: the kernel reclaims their page cache."""
    path = tmp_path / "weights.bin"
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(384):
            f.write(block)
    evict_page_cache(path)  # uncached: the child's reads are charged to its group
    read_all = ("import mmap, sys\nf = open(sys.argv[1], 'rb')\nm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
                "total = sum(m[i] for i in range(0, len(m), 4096))\nprint(len(m) >> 20)")
    run = run_limited([*_python(read_all), str(path)], 96 * MIB, stdout=subprocess.PIPE)
    assert run.returncode == 0 and not run.oom_killed
    # The file did press on the limit: its pages were charged to the group and reclaimed.
    assert run.max_usage_bytes >= 64 * MIB


def test_writing_a_file_bigger_than_the_limit_does_not_kill(memory_cgroup, tmp_path):
    """A GGUF written under the cap: its dirty page cache is written back and reclaimed, not OOM-killed."""
    write = ("import os, sys\nblock = os.urandom(1 << 20)\nwith open(sys.argv[1], 'wb') as f:\n"
             "    for _ in range(384):\n        f.write(block)")
    run = run_limited([*_python(write), str(tmp_path / "big.bin")], 96 * MIB)
    assert run.returncode == 0 and not run.oom_killed
    assert (tmp_path / "big.bin").stat().st_size == 384 * MIB
    assert run.max_usage_bytes >= 64 * MIB


def test_the_group_is_removed_with_what_the_command_left_running(memory_cgroup, tmp_path):
    pid_file = tmp_path / "orphan.pid"
    run = run_limited(["/bin/sh", "-c", f"sleep 300 & echo $! > {pid_file}"], 64 * MIB)
    assert run.returncode == 0
    orphan = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{orphan}").exists() and _state(orphan) != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{orphan}").exists() or _state(orphan) == "Z"
    leftovers = [p for p in Path("/sys/fs/cgroup").rglob(f"edgeprune-{os.getpid()}-*")] if os.path.isdir(
        "/sys/fs/cgroup") else []
    assert leftovers == []


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rfind(")") + 2]


def test_unlimited_runs_are_sampled_too():
    run = run_limited(_allocate(48, "time.sleep(0.5)"), None, period_s=0.05)
    assert run.returncode == 0 and run.limit_bytes is None and run.cgroup_version is None
    assert run.peak_anon_bytes >= 48 * MIB and run.max_usage_bytes is None


def test_tree_memory_counts_a_grandchild():
    # `; exit` keeps the shell from exec'ing python: the allocation happens in a grandchild.
    child = subprocess.Popen(["/bin/sh", "-c", " ".join(
        _quote(a) for a in _allocate(80, "print('ready', flush=True)\nsys.stdin.read()")) + "; exit 0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        tree = process_tree(child.pid)
        now = tree_memory(child.pid)
        assert len(tree) == 2 and tree[0] == child.pid
        assert now.processes == 2
        assert now.anon_bytes >= 80 * MIB and now.rss_bytes >= now.anon_bytes
    finally:
        child.communicate("")
    assert process_tree(child.pid) == [] and tree_memory(child.pid).processes == 0


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def test_tree_sampler_keeps_the_peak_of_a_child_that_frees_it():
    code = "import time\nb = b'\\1' * (72 << 20)\ntime.sleep(0.6)\ndel b\ntime.sleep(0.6)"
    child = subprocess.Popen(_python(code))
    with TreeSampler(child.pid, period_s=0.05) as sampler:
        child.wait()
    assert sampler.samples > 5
    assert sampler.peak_anon_bytes >= 72 * MIB
    assert 0 < sampler.peak_anon_at_s < 2
    assert tree_memory(child.pid).anon_bytes == 0  # gone
