"""Device base class and registry (subclasses register by their URL scheme).

A device runs programs (`exec`), holds files (`stage`) and measures models (`benchmark`). The
llama.cpp tools it runs are a directory of binaries built for its architecture (`use_tools`):
the bundle's `bin/`, or the toolchain cache's build for the target.
"""

from __future__ import annotations

import logging
import platform
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from edgeprune.config import DeviceConfig
from edgeprune.errors import EdgepruneError
from edgeprune.measure import BenchmarkRecord, Workload

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
        self.tools: Path | None = None

    @property
    @abstractmethod
    def arch(self) -> str:
        """The CPU architecture measurements run on."""

    @property
    @abstractmethod
    def cores(self) -> int:
        """Cores available for a run."""

    @property
    def runs_binaries(self) -> bool:
        """Whether `benchmark` runs llama.cpp's own binaries (which `use_tools` must provide)."""
        return False

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

    def tool(self, argv: list[str]) -> list[str]:
        """How the device runs one of its architecture's binaries (an emulator prefixes it)."""
        return argv

    def use_tools(self, directory: Path, arch: str) -> None:
        """Run llama.cpp from `directory`, binaries built for `arch`."""
        if arch != self.arch:
            raise EdgepruneError(f"The llama.cpp binaries in {directory} are built for {arch}, but {self.url} is "
                                 f"{self.arch}; build them for the device's architecture.")
        self.tools = directory

    def tool_path(self, name: str) -> str:
        if self.tools is None:
            raise EdgepruneError(f"{self.url} runs llama.cpp's own binaries, and none were given for it.")
        return self.stage(self.tools / name, executable=True)

    @abstractmethod
    def benchmark(self, model: Path, workload: Workload, baseline: Path | None = None) -> BenchmarkRecord:
        """Run the workload on `model` (alternating with `baseline`, if given); raw and summarised timings."""

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
