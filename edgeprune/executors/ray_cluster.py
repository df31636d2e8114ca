"""Candidate builds as tasks on a Ray cluster (`--executor ray`, an optional extra: edgeprune[ray]).

Each job is a task asking for as many CPUs as the build's threads (at most a node's), retried when
its worker or node dies. The cluster's nodes must share the build's cache directory and run the
same edgeprune and tools (a stage's key names the code and tool versions: a node that differs
writes outputs the build cannot find, and the build says so). The cache is where outputs live:
a task returns only where it ran, so a node that dies takes no finished candidate with it, and a
retried task finds the stages it had finished.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.executors.base import Executor
from edgeprune.executors.job import BuildContext, Built, CandidateJob, ContextSpec

log = logging.getLogger(__name__)

RETRIES = 3  # a task whose worker or node dies is run again this many times
PROBE_TIMEOUT_S = 10
LOCAL_OBJECT_STORE = 128 << 20  # a Ray started here: jobs pass paths and small specs, never weights


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EdgepruneError("--executor ray needs Ray, an optional extra: pip install 'edgeprune[ray]'.") from None
    return ray


class RayCluster(Executor, scheme="ray"):
    """`ray`: a Ray started on this machine (or the cluster RAY_ADDRESS names); `ray:HOST:PORT` or
    `ray:auto`: a cluster's head, from a node of it; `ray://HOST:PORT`: a Ray Client server."""

    @classmethod
    def check_address(cls, address: str | None) -> None:
        if address is None or address == "auto":
            return
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"'{address}' is not a Ray address: give HOST:PORT (ray:10.0.0.5:6379, "
                             "ray://10.0.0.5:10001) or auto")

    def __init__(self, address: str | None = None) -> None:
        ray = _ray()
        self.address = address
        self.owned = not ray.is_initialized()
        if self.owned:
            quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
            starts_here = address is None and not os.environ.get("RAY_ADDRESS")
            if not starts_here:
                _probe(address or os.environ["RAY_ADDRESS"])
            try:
                if starts_here:
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                             object_store_memory=LOCAL_OBJECT_STORE, **quiet)
                else:
                    ray.init(address=address, **quiet)
            except (ConnectionError, TimeoutError, RuntimeError) as e:
                where = address or os.environ.get("RAY_ADDRESS")
                raise EdgepruneError(f"Could not reach the Ray cluster at {where} ({e}): start it (ray start --head) "
                                     "or give its address as --executor ray:HOST:PORT or ray://HOST:PORT.") from None
        self.ray = ray

    def describe(self) -> str:
        nodes = [n for n in self.ray.nodes() if n["Alive"]]
        cpus = sum(int(n["Resources"].get("CPU", 0)) for n in nodes)
        return f"ray ({self.address or 'local'}: {len(nodes)} node(s), {cpus} CPUs)"

    def largest_node_cpus(self) -> int:
        cpus = [int(n["Resources"].get("CPU", 0)) for n in self.ray.nodes() if n["Alive"]]
        if not cpus or max(cpus) == 0:
            raise EdgepruneError("The Ray cluster has no node with a CPU to build candidates on: add a worker node "
                                 "(ray start --address HEAD:PORT).")
        return max(cpus)

    def run(self, context: BuildContext, jobs: list[CandidateJob], threads: int) -> Iterator[Built]:
        ray = self.ray
        cpus = min(threads, self.largest_node_cpus())
        spec = ray.put(context.spec)
        task = ray.remote(_run_job)
        pending = {task.options(num_cpus=cpus, max_retries=RETRIES, name=f"edgeprune-build-{job.cid}")
                   .remote(spec, job, cpus): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                yield self._result(done[0], job)
        finally:
            for ref in pending:  # the build stopped (an error, a kill): what it no longer waits for
                ray.cancel(ref, force=True)

    def _result(self, ref: Any, job: CandidateJob) -> Built:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the job itself raised: its own error, as if run here
            raise e.cause from None
        except ray.exceptions.RayError as e:
            raise EdgepruneError(
                f"Ray could not build {job.cid}: its worker died {RETRIES + 1} times ({type(e).__name__}); the "
                "candidates already built are in the cache, so the same command resumes.") from None

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()


def _probe(address: str) -> None:
    """One sentence now if nothing listens at the address (Ray itself would retry for minutes)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise EdgepruneError(f"Nothing answers at the Ray address {address} ({e}): start the cluster (ray start "
                             "--head) or give its head's address as --executor ray:HOST:PORT or ray://HOST:PORT.") \
            from None


def _run_job(spec: ContextSpec, job: CandidateJob, threads: int) -> Built:
    """A Ray task: one job, in a worker of whichever node Ray chose."""
    import ray

    node = ray.get_runtime_context().get_node_id()[:8]
    return spec.open().run(job, threads, f"ray node {node} on {os.uname().nodename} (pid {os.getpid()})")
