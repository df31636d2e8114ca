"""Resident memory from /proc (Linux): this process's, for reports of peak RSS, and a process tree's,
sampled from outside (benchmarks, memory-capped runs)."""

from __future__ import annotations

import ctypes
import os
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak RSS since exec (or the last `reset_peak_rss`). ru_maxrss would report a forking parent's."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter at the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    glibc keeps freed mid-sized blocks in its heap, so a loop that allocates and frees a layer's
    worth of tensors at a time shows RSS growing as if nothing were freed.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- A process tree's memory, sampled from outside it ---------------------------------------------
#
# Anonymous memory (RssAnon + RssShmem) is what a memory limit really bounds: the kernel reclaims the
# page cache of memory-mapped weights under pressure, so plain RSS overstates what a build needs.
# Both are summed over the process and all its descendants (llama.cpp runs in children); pages two
# processes share are counted twice, an upper bound.


@dataclass(frozen=True)
class TreeMemory:
    anon_bytes: int  # RssAnon + RssShmem
    rss_bytes: int  # VmRSS
    processes: int


def _proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status we need; {} if the process is gone (or a kernel thread)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc/*/stat (/proc/<pid>/task/*/children needs
    CONFIG_PROC_CHILDREN, which not every kernel has)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(pid: int) -> list[int]:
    """`pid` and all its living descendants (empty if `pid` is gone)."""
    children: dict[int, list[int]] = {}
    parents = _parents()
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    if pid not in parents:
        return []
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def tree_memory(pid: int) -> TreeMemory:
    """Resident memory of `pid` and its descendants, now."""
    anon = rss = n = 0
    for p in process_tree(pid):
        status = _proc_status(p)
        if status:
            anon += status.get("RssAnon", 0) + status.get("RssShmem", 0)
            rss += status.get("VmRSS", 0)
            n += 1
    return TreeMemory(anon, rss, n)


class TreeSampler:
    """Samples a process tree's memory every `period_s` in a thread and keeps the peaks.

        with TreeSampler(child.pid) as sampler:
            child.wait()
        sampler.peak_anon_bytes

    A period of 0.1–0.25 s misses only spikes shorter than that; a memory cgroup's
    max_usage_in_bytes (edgeprune.cgroup) is the kernel's exact peak, page cache included.
    """

    def __init__(self, pid: int | None = None, period_s: float = 0.2) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.period_s = period_s
        self.peak_anon_bytes = 0
        self.peak_rss_bytes = 0
        self.peak_processes = 0
        self.peak_anon_at_s = 0.0  # seconds after start() when each peak was seen
        self.peak_rss_at_s = 0.0
        self.samples = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> TreeMemory:
        now = tree_memory(self.pid)
        if now.anon_bytes > self.peak_anon_bytes:
            self.peak_anon_bytes, self.peak_anon_at_s = now.anon_bytes, time.monotonic() - self._t0
        if now.rss_bytes > self.peak_rss_bytes:
            self.peak_rss_bytes, self.peak_rss_at_s = now.rss_bytes, time.monotonic() - self._t0
        self.peak_processes = max(self.peak_processes, now.processes)
        self.samples += 1
        return now

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def start(self) -> TreeSampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"tree-sampler-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TreeSampler:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self

    def __enter__(self) -> TreeSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def to_dict(self) -> dict[str, int | float]:
        return {"peak_anon_bytes": self.peak_anon_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "peak_anon_at_s": round(self.peak_anon_at_s, 2), "peak_rss_at_s": round(self.peak_rss_at_s, 2),
                "peak_processes": self.peak_processes, "samples": self.samples, "period_s": self.period_s}


def evict_page_cache(path: Path) -> None:
    """Drop the page cache of a file, or of every file under a directory (posix_fadvise DONTNEED after
    fsync: dirty pages stay otherwise), so the next reader starts cold and its memory cgroup is charged
    for the pages it maps, as on a machine that just booted."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
