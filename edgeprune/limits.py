"""What this machine can give a job: memory (MemAvailable, the memory cgroup's headroom, or
EDGEPRUNE_MEMORY_LIMIT, whichever is least) and free disk where it will write."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import EdgepruneError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def fmt(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


@dataclass(frozen=True)
class Disk:
    path: Path  # the directory asked about (it may not exist yet)
    free: int
    device: int


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes the job may hold at its peak (this process's current memory included)
    memory_source: str  # what set it: MemAvailable, a cgroup's limit, EDGEPRUNE_MEMORY_LIMIT
    cache: Disk
    output: Disk | None = None


MEMORY_LIMIT_ENV = "EDGEPRUNE_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": 1000, "kib": KiB, "m": MiB, "mb": 1000**2, "mib": MiB,
          "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, what: str = MEMORY_LIMIT_ENV) -> int:
    """'8GiB', '8G' (binary, as docker and systemd read it), '8GB' (decimal), '512MiB', or bytes."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise EdgepruneError(f"{what}={text!r} is not a size: write it as 8GiB, 7.5GiB, 8000MB or a number of bytes.")
    return int(float(m.group(1)) * _UNITS[unit])


def meminfo_available(text: str) -> int | None:
    """MemAvailable of /proc/meminfo's text, in bytes."""
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * KiB if m else None


_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as LONG_MAX rounded down to a page


def _unescape(path: str) -> str:
    """mountinfo escapes spaces, tabs, newlines and backslashes as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def cgroup_memory_dir(cgroup_text: str, mountinfo_text: str) -> tuple[Path, Path, int] | None:
    """(this process's memory cgroup directory, the hierarchy's mount point, cgroup version) from the
    texts of /proc/self/cgroup and /proc/self/mountinfo; None without a memory controller."""
    v1 = v2 = None
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1 = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    mounts: dict[int, tuple[str, Path]] = {}
    for line in mountinfo_text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup" and "memory" in options.split(",") and 1 not in mounts:
            mounts[1] = (root, point)
        elif fstype == "cgroup2" and 2 not in mounts:
            mounts[2] = (root, point)
    for version, path in ((1, v1), (2, v2)):
        if path is None or version not in mounts:
            continue
        root, point = mounts[version]
        relative = path[len(root):] if root != "/" and path.startswith(root) else path
        directory = point / relative.lstrip("/")
        if version == 2 and not (directory / "memory.max").exists() and not (point / "memory.stat").exists():
            continue  # a v2 hierarchy without the memory controller
        return directory, point, version
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(directory: Path, mount_point: Path, version: int) -> tuple[int, int] | None:
    """(limit minus usage, the limit) of the tightest memory cgroup from `directory` up to the
    hierarchy's root; None when no level sets a limit. Usage leaves out inactive page cache, which
    the kernel reclaims before it kills anything."""
    limit_file, usage_file, inactive = (("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                                        if version == 1 else ("memory.max", "memory.current", "inactive_file"))
    best: tuple[int, int] | None = None
    level = directory
    while True:
        limit = _read_int(level / limit_file)
        if limit is not None:
            usage = _read_int(level / usage_file) or 0
            usage -= min(usage, _stat_value(level / "memory.stat", inactive))
            headroom = max(0, limit - usage)
            if best is None or headroom < best[0]:
                best = (headroom, limit)
        if level == mount_point or level.parent == level or mount_point not in level.parents:
            break
        level = level.parent
    return best


def _own_anonymous() -> int:
    """This process's anonymous memory: already in use, and already counted in the estimate's baseline."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    m = re.search(r"^RssAnon:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * KiB if m else 0


def _disk(path: Path) -> Disk:
    existing = path.expanduser().absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return Disk(path, shutil.disk_usage(existing).free, os.stat(existing).st_dev)


def _memory_candidates(env: Mapping[str, str], proc: Path, own: int) -> list[tuple[int, str]]:
    """Each bound on the memory a job may use, with its source: MemAvailable and the memory
    cgroup's headroom (plus `own`, what the asking process already holds), the override."""
    candidates: list[tuple[int, str]] = []
    try:
        available = meminfo_available((proc / "meminfo").read_text())
    except OSError:
        available = None
    if available is not None:
        candidates.append((available + own, "MemAvailable"))
    try:
        found = cgroup_memory_dir((proc / "self/cgroup").read_text(), (proc / "self/mountinfo").read_text())
    except OSError:
        found = None
    if found is not None:
        headroom = cgroup_headroom(*found)
        if headroom is not None:
            directory, point, version = found
            name = "/" + str(directory.relative_to(point)).lstrip(".") if directory != point else "/"
            candidates.append((headroom[0] + own, f"memory cgroup {name}, limit {fmt(headroom[1])}"))
    if env.get(MEMORY_LIMIT_ENV):
        candidates.append((parse_size(env[MEMORY_LIMIT_ENV]), f"{MEMORY_LIMIT_ENV}={env[MEMORY_LIMIT_ENV]}"))
    return candidates


def machine_limits(cache_dir: Path, output_dir: Path | None = None, env: Mapping[str, str] | None = None,
                   proc: Path = Path("/proc")) -> Limits:
    """What the machine can give: memory = the least of MemAvailable, the memory cgroup's limit minus
    its usage, and $EDGEPRUNE_MEMORY_LIMIT (plus what this process already holds, except for the
    override, which caps the whole job); free disk where the cache and the output go."""
    candidates = _memory_candidates(os.environ if env is None else env, proc, _own_anonymous())
    memory, source = min(candidates) if candidates else (_UNLIMITED, "unknown")
    return Limits(memory, source, _disk(cache_dir), _disk(output_dir) if output_dir is not None else None)


def memory_headroom(proc: Path = Path("/proc")) -> int:
    """Memory a new process could still take now: the least of MemAvailable and the memory cgroup's
    headroom (the override caps a whole job, not what is left of it)."""
    candidates = _memory_candidates({}, proc, 0)
    return min(candidates)[0] if candidates else _UNLIMITED
