"""An aarch64 device emulated by qemu-user on this machine: proves the ARM build runs and agrees
with the host. Its timings are marked emulated and never judged against a budget."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from edgeprune.devices.base import TIMEOUT_S, Device
from edgeprune.devices.local import run_local
from edgeprune.errors import EdgepruneError

SYSROOT = Path("/usr/aarch64-linux-gnu")  # serves a dynamically linked build; ours are static


class QemuAarch64Device(Device):
    scheme = "qemu-aarch64"
    emulated = True

    @property
    def arch(self) -> str:
        return "aarch64"

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0))

    @property
    def cpu(self) -> str:
        return "qemu-aarch64 (emulated)"

    def tool(self, argv: list[str]) -> list[str]:
        if shutil.which(self.scheme) is None:
            raise EdgepruneError(f"{self.scheme} is not installed: install the Debian package qemu-user "
                                 "(apt-get install qemu-user).")
        return [self.scheme, *(["-L", str(SYSROOT)] if SYSROOT.is_dir() else []), *argv]

    def exec(self, argv: list[str], what: str, stdin: bytes | Path | None = None,
             timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        return run_local(argv, what, stdin, timeout)
