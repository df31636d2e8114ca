"""Candidate builds as tasks on a real Ray cluster: a head and two one-CPU worker nodes on 127.0.0.1
(ray.cluster_utils runs each node's own raylet), the build run through the CLI with
`--executor ray:ADDRESS`. A worker node killed while it builds a candidate costs the build nothing
it had finished: finished candidates stay in the (shared) stage cache, the lost task runs again on
the other node."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import calibration_text, save_tiny_hf, tiny_build_context

pytestmark = pytest.mark.slow

MIB = 1 << 20


@pytest.fixture
def ray_cluster(monkeypatch):
    # Ray replaces 127.0.0.1 by the machine's own address unless told the cluster is this machine only
    # (its switch for laptops); the environment carries it to the nodes and the build's driver.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    local = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * MIB}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **local})
    try:
        workers = [cluster.add_node(num_cpus=1, **local) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        cluster.shutdown()


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _node_of(pid: int, raylets: dict[int, object]) -> object | None:
    """The cluster node whose raylet started process `pid` (workers are its children)."""
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            return None
    return None


def _finished(stage_dir: Path) -> dict[str, tuple[int, int]]:
    """Complete entries of a stage: name -> (inode, mtime of its result) — a rebuilt one changes both."""
    out = {}
    for entry in stage_dir.glob("*") if stage_dir.is_dir() else []:
        result = entry / "result.json"
        if ".tmp-" not in entry.name and result.is_file():
            out[entry.name] = (entry.stat().st_ino, result.stat().st_mtime_ns)
    return out


def test_a_killed_worker_node_loses_no_finished_candidate(tmp_path, ray_cluster):
    cluster, workers = ray_cluster
    model = save_tiny_hf(tmp_path / "tiny", vocab=512, n_layers=8)
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text())
    cache, out = tmp_path / "cache", tmp_path / "out"
    stage_dir = cache / "stages" / "candidate-model"
    # 10x cannot be met: the search builds until its limits, in rounds of candidates built side by side.
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeprune", "build", "--target", "demo", "--profile", "quick", "--model", str(model),
         "--calib", str(calib), "--speedup", "10", "-o", str(out), "--cache-dir", str(cache),
         "--executor", f"ray:{cluster.address}", "-q"], stderr=subprocess.PIPE, text=True)
    raylets = {_raylet_pid(n): n for n in workers}
    killed, before = None, {}
    deadline = time.monotonic() + 300
    while proc.poll() is None and killed is None and time.monotonic() < deadline:
        finished = _finished(stage_dir)
        writers = [int(m.group(1)) for p in (stage_dir.glob("*.tmp-*") if finished else [])
                   if (m := re.search(r"@(\d+)-", p.name))]
        node = next((n for n in map(lambda pid: _node_of(pid, raylets), writers) if n is not None), None)
        if node is not None:  # a candidate is being built on `node`, and at least one is finished
            before = finished
            cluster.remove_node(node, allow_graceful=False)
            killed = node
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=600)
    assert killed is not None, f"no candidate was caught mid-build on a worker node: {stderr}"

    # The build went on without the node, to the search's own end (10x is out of reach: exit 1).
    assert proc.returncode == 1 and "No candidate within the search limits meets the budget" in stderr, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["executor"].startswith(f"ray ({cluster.address}") and report["search"]["budget_met"] is False
    candidates = report["search"]["candidates"]
    assert len(candidates) >= 4 and all(c["built_on"].startswith("ray node ") for c in candidates)
    ids = {w.node_id[:8] for w in workers}
    nodes = {c["built_on"].split()[2] for c in candidates}
    assert nodes <= ids and ids - {killed.node_id[:8]} <= nodes  # the node left standing built the rest
    # Every candidate finished before the kill is the same entry after the build: nothing was rebuilt.
    after = _finished(stage_dir)
    assert before and all(after[name] == entry for name, entry in before.items())
    # The one being built when the node died was built again on the other node: every candidate has its file.
    assert len(after) > len(before)


def test_a_node_that_does_not_share_the_cache_is_named(tmp_path, ray_cluster, monkeypatch):
    """A worker writing to a cache the build cannot see (no shared mount): one sentence, not a wrong result."""
    import dataclasses

    import ray

    from edgeprune.config import load_profile
    from edgeprune.devices import get_device
    from edgeprune.errors import EdgepruneError
    from edgeprune.evaluator import CandidateEvaluator
    from edgeprune.executors import open_executor
    from edgeprune.fleet import Fleet
    from edgeprune.measure import Workload
    from edgeprune.prune import Plan
    from edgeprune.runtimes.registry import get_runtime
    from edgeprune.search import State

    cluster, _ = ray_cluster
    context = tiny_build_context(tmp_path)
    # The workers' view of the cache: another directory, as on a node without the shared mount.
    context.spec = dataclasses.replace(context.spec, stage_root=tmp_path / "elsewhere" / "stages")
    with get_device("local") as device, open_executor(f"ray:{cluster.address}") as executor:
        fleet = Fleet([{"llama.cpp": get_runtime().runner(device)}])
        evaluator = CandidateEvaluator(context, fleet, Workload((1, 2), 2, 1, 0, 3), load_profile("quick").search,
                                       threads=1, executor=executor)
        with pytest.raises(EdgepruneError, match="must share the cache directory"):
            evaluator.build(State(1), Plan(drop_layers=(1,)), "c01")
    assert not ray.is_initialized()  # the executor let go of the cluster it joined
    assert list((tmp_path / "elsewhere" / "stages" / "candidate-model").glob("*/result.json"))
