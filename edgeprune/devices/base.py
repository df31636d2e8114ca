"""Device base class and registry (subclasses register by their URL scheme).

A device is where a measurement happens: it runs programs (`exec`, `run_worker`), holds files
(`stage`) and says what it is (`arch`, `cores`, `cpu`). What it runs, and how that times a model,
is a runtime's (`edgeprune.runtimes`).
"""

from __future__ import annotations

import logging
import platform
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgeprune.config import DeviceConfig
from edgeprune.errors import EdgepruneError

log = logging.getLogger(__name__)

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}
TIMEOUT_S = 1800  # one program run; an emulated or slow device answers at a few tokens/s


def host_arch() -> str:
    return normalize_arch(platform.machine())


def normalize_arch(machine: str) -> str:
    machine = machine.strip().lower()
    return _ARCH_ALIASES.get(machine, machine)


class DeviceError(EdgepruneError):
    """The device could not be reached or could not run what it was asked to."""


class DeviceUnreachable(DeviceError):
    """The device stopped answering (its reconnection attempts spent): a fleet drops it, where a
    program failing on it would fail on any device."""


@dataclass
class WorkerRun:
    returncode: int  # negative: the signal that ended it
    stdout: bytes
    stderr: bytes
    peak_rss_bytes: int = 0  # measured only under a RAM cap
    ram_cap_exceeded: bool = False  # stopped at the cap


class Device(ABC):
    scheme: ClassVar[str]
    emulated: ClassVar[bool] = False  # timings from an emulator are never evidence for a budget
    registry: ClassVar[dict[str, type[Device]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Device.registry[cls.scheme] = cls

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.url = config.url

    @property
    @abstractmethod
    def arch(self) -> str:
        """The CPU architecture measurements run on."""

    @property
    @abstractmethod
    def cores(self) -> int:
        """Cores available for a run."""

    @property
    def python(self) -> str | None:
        """The Python interpreter with edgeprune installed that runs workers there (None: none)."""
        return None

    @property
    def cpu(self) -> str:
        """The CPU model, as /proc/cpuinfo names it."""
        return ""

    @abstractmethod
    def exec(self, argv: list[str], what: str, stdin: bytes | Path | None = None,
             timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run `argv` on the device; raise DeviceError naming `what` if it cannot run or fails."""

    def stage(self, path: Path, executable: bool = False) -> str:
        """The path under which the device sees a local file (copied there if need be)."""
        return str(path)

    def stage_tree(self, directory: Path) -> str:
        """The path under which the device sees a local directory (copied there whole if need be)."""
        return str(directory)

    def tool(self, argv: list[str]) -> list[str]:
        """How the device runs one of its architecture's binaries (an emulator prefixes it)."""
        return argv

    def run_worker(self, argv: list[str], request: bytes, what: str, ram_cap: int | None = None) -> WorkerRun:
        """Run `python argv...` there with `request` on stdin; `ram_cap`: stop it past that many bytes."""
        if self.python is None:
            raise DeviceError(f"{self.url} has no Python to run {what} with.")
        if ram_cap is not None:
            raise EdgepruneError(f"{self.url} cannot hold a run to a RAM cap; only local runs can.")
        proc = self.exec([self.python, *argv], what, stdin=request)
        return WorkerRun(proc.returncode, proc.stdout, proc.stderr)

    def memory_headroom(self) -> int | None:
        """Bytes a run can still take there before memory runs out (None: the device cannot tell)."""
        return None

    def close(self) -> None:  # noqa: B027 (an optional hook)
        """Release what the device holds for this session (remote files)."""

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_device(config: DeviceConfig | str) -> Device:
    if isinstance(config, str):
        try:
            config = DeviceConfig(url=config)
        except ValueError:
            raise EdgepruneError(
                f"Unknown device '{config}': edgeprune measures on local, ssh://[user@]host[:port] or qemu-aarch64."
            ) from None
    scheme = config.url.split("://", 1)[0] if "://" in config.url else config.url
    if scheme not in Device.registry:
        known = ", ".join(sorted(Device.registry))
        raise EdgepruneError(f"Unknown device '{config.url}': edgeprune can measure on {known}.")
    return Device.registry[scheme](config)
