"""Run a command under a hard memory limit: a fresh memory cgroup (v1, or v2 where it is delegated).

A cgroup limit is what a user's machine does to a build that outgrows its RAM: anonymous memory over
the limit gets the process OOM-killed, while the page cache of memory-mapped weights is reclaimed.
RLIMIT_AS cannot stand in for it: it counts mapped files and would forbid mmap itself.

    run = run_limited(["edgeprune", "prune", ...], limit_bytes=8 << 30)
    run.oom_killed, run.max_usage_bytes, run.peak_anon_bytes

The group is made under this process's own memory cgroup when it can be (else under the root),
and removed afterwards. `unavailable_reason()` says why no group can be made here (tests skip
with it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.memory import TreeSampler

# The child joins the group itself before exec'ing the command, so every page it ever maps is charged
# to the group (a preexec_fn would do the same but is unsafe in a parent that runs threads).
_JOIN = 'echo $$ > "$0" || exit 125; exec "$@"'
_JOIN_FAILED = 125


class CgroupUnavailable(EdgepruneError):
    """No memory cgroup can be created (or joined) on this machine; the message says why."""


@dataclass
class CgroupRun:
    returncode: int
    oom_killed: bool  # the kernel's OOM killer killed a process of the group (not necessarily the root)
    oom_kills: int
    limit_bytes: int | None  # None: run without a group
    max_usage_bytes: int | None  # the kernel's peak charge: anonymous memory *and* page cache
    failcnt: int | None  # times usage hit the limit (v1; page-cache reclaim counts too, so not an OOM sign)
    wall_s: float
    peak_anon_bytes: int  # sampled over the process tree: RssAnon + RssShmem
    peak_rss_bytes: int  # sampled over the process tree: VmRSS (page cache of mapped files included)
    peak_anon_at_s: float  # when the peaks were sampled, seconds after the start
    peak_rss_at_s: float
    cgroup_version: int | None
    timed_out: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fs type, super options) of every cgroup mount."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) >= 5 and len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                    out.append((fields[3], fields[4], rfields[0], rfields[2]))
    except OSError:
        pass
    return out


def _own_paths() -> dict[str, str]:
    """Controller ("memory", or "" for the v2 unified tree) -> this process's cgroup path."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _candidate_parents() -> tuple[int, list[Path]] | str:
    """The cgroup version and the directories a new memory group may go under (own group first),
    or why there are none."""
    mounts, own = _mounts(), _own_paths()
    for root, point, fstype, options in mounts:
        if fstype == "cgroup" and "memory" in options.split(","):
            rel = os.path.relpath(own.get("memory", "/"), root) if own.get("memory", "/").startswith(root) else "."
            parents = [Path(point) / rel, Path(point)] if rel != "." else [Path(point)]
            return 1, parents
    for root, point, fstype, _ in mounts:
        if fstype == "cgroup2":
            base = Path(point)
            try:
                controllers = (base / "cgroup.controllers").read_text().split()
            except OSError:
                controllers = []
            if "memory" not in controllers:
                return f"the cgroup v2 tree at {point} does not offer the memory controller"
            path = own.get("", "/")
            rel = os.path.relpath(path, root) if path.startswith(root) else "."
            return 2, ([base / rel, base] if rel != "." else [base])
    return "no cgroup v1 memory controller or cgroup v2 tree is mounted (see /proc/self/mountinfo)"


class MemoryCgroup:
    """A fresh memory cgroup with a hard limit (swap included, where there is swap); removed on close."""

    def __init__(self, limit_bytes: int, prefix: str = "edgeprune") -> None:
        found = _candidate_parents()
        if isinstance(found, str):
            raise CgroupUnavailable(f"Cannot create a memory cgroup here: {found}.")
        self.version, parents = found
        self.limit_bytes = int(limit_bytes)
        name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        errors = []
        for parent in parents:
            try:
                self.path = self._make(parent / name)
                return
            except OSError as e:
                errors.append(f"{parent}: {e.strerror or e}")
        raise CgroupUnavailable(f"Cannot create a memory cgroup here ({'; '.join(errors)}).")

    def _make(self, path: Path) -> Path:
        path.mkdir()
        try:
            if self.version == 1:
                (path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
                memsw = path / "memory.memsw.limit_in_bytes"
                if memsw.exists():  # only with swap accounting; must not be below limit_in_bytes
                    memsw.write_text(str(self.limit_bytes))
            else:
                if not (path / "memory.max").exists():
                    raise OSError(0, f"the memory controller is not enabled for {path.parent}'s children "
                                     "(cgroup.subtree_control)")
                (path / "memory.max").write_text(str(self.limit_bytes))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
        except OSError:
            path.rmdir()
            raise
        return path

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs_file.read_text().split()]
        except OSError:
            return []

    def _counter(self, file: str, key: str) -> int | None:
        try:
            for line in (self.path / file).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
        except (OSError, ValueError):
            pass
        return None

    def _value(self, file: str) -> int | None:
        try:
            return int((self.path / file).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stats(self) -> dict[str, int | None]:
        if self.version == 1:
            return {"oom_kills": self._counter("memory.oom_control", "oom_kill"),
                    "failcnt": self._value("memory.failcnt"),
                    "max_usage_bytes": self._value("memory.max_usage_in_bytes")}
        return {"oom_kills": self._counter("memory.events", "oom_kill"), "failcnt": None,
                "max_usage_bytes": self._value("memory.peak")}  # memory.peak: Linux >= 5.19

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Kill what is left in the group (orphaned grandchildren) and remove it."""
        deadline = time.monotonic() + 10
        while True:
            self.kill_all()
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY while the killed processes exit
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_limited(cmd: Sequence[str], limit_bytes: int | None, *, period_s: float = 0.2,
                timeout_s: float | None = None, **popen_kwargs: Any) -> CgroupRun:
    """Run `cmd` in a fresh memory cgroup limited to `limit_bytes` (None: no group, no limit), sampling
    its process tree's memory; wait for it and remove the group. `popen_kwargs` go to
    subprocess.Popen (stdout, env, cwd, ...)."""
    group = MemoryCgroup(limit_bytes) if limit_bytes is not None else None
    try:
        argv = ["/bin/sh", "-c", _JOIN, str(group.procs_file), *cmd] if group else list(cmd)
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, **popen_kwargs)
        timed_out = False
        with TreeSampler(proc.pid, period_s) as sampler:
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                if group:
                    group.kill_all()
                else:
                    proc.kill()
                returncode = proc.wait()
        wall = time.perf_counter() - t0
        stats = group.stats() if group else {"oom_kills": 0, "failcnt": None, "max_usage_bytes": None}
    finally:
        if group:
            group.close()  # kills what the command left running in it: not ours to keep
    if group and returncode == _JOIN_FAILED and not stats["max_usage_bytes"]:  # nothing was ever charged to it
        raise CgroupUnavailable(f"Cannot put a process into the memory cgroup {group.path} (writing its "
                                "cgroup.procs failed).")
    oom_kills = stats["oom_kills"]
    if oom_kills is None:  # kernels before 4.13 have no counter: a SIGKILL after hitting the limit is the sign
        oom_killed = returncode == -signal.SIGKILL and bool(stats["failcnt"])
    else:
        oom_killed = oom_kills > 0
    return CgroupRun(returncode=returncode, oom_killed=oom_killed, oom_kills=oom_kills or 0, limit_bytes=limit_bytes,
                     max_usage_bytes=stats["max_usage_bytes"], failcnt=stats["failcnt"], wall_s=wall,
                     peak_anon_bytes=sampler.peak_anon_bytes, peak_rss_bytes=sampler.peak_rss_bytes,
                     peak_anon_at_s=sampler.peak_anon_at_s, peak_rss_at_s=sampler.peak_rss_at_s,
                     cgroup_version=group.version if group else None, timed_out=timed_out)


def unavailable_reason(limit_bytes: int = 64 << 20) -> str | None:
    """Why a command cannot run in a memory cgroup here, or None when it can (checked by doing it)."""
    try:
        run = run_limited(["true"], limit_bytes, period_s=0.05, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except CgroupUnavailable as e:
        return str(e)
    except OSError as e:
        return f"Cannot create a memory cgroup here ({e})."
    if run.returncode != 0:
        return f"A trivial command failed inside a memory cgroup (exit status {run.returncode})."
    return None
