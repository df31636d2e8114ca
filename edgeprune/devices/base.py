"""Device base class and registry (subclasses register by their URL scheme)."""

from __future__ import annotations

import platform
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from edgeprune.errors import EdgepruneError
from edgeprune.measure import BenchmarkRecord, Workload

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


class Device(ABC):
    scheme: ClassVar[str]
    registry: ClassVar[dict[str, type[Device]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Device.registry[cls.scheme] = cls

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    @abstractmethod
    def arch(self) -> str:
        """The CPU architecture measurements run on."""

    @property
    @abstractmethod
    def cores(self) -> int:
        """Cores available for a run."""

    @abstractmethod
    def benchmark(self, model: Path, workload: Workload, baseline: Path | None = None) -> BenchmarkRecord:
        """Run the workload on `model` (alternating with `baseline`, if given); raw and summarised timings."""


def get_device(url: str) -> Device:
    scheme = url.split("://", 1)[0] if "://" in url else url
    if scheme not in Device.registry:
        known = ", ".join(sorted(Device.registry))
        raise EdgepruneError(f"Unknown device '{url}': edgeprune can measure on {known}.")
    return Device.registry[scheme](url)
