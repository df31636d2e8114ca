"""An aarch64 device emulated by qemu-user on this machine: proves the ARM build runs and agrees
with the host. Its timings are marked emulated and never judged against a budget."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeprune.devices.base import TIMEOUT_S, Device
from edgeprune.devices.local import run_local
from edgeprune.errors import EdgepruneError

SYSROOT = Path("/usr/aarch64-linux-gnu")  # serves a dynamically linked build; ours are static
# qemu-user passes the host's /proc/cpuinfo through, and an x86 one crashes ARM programs that parse
# it (onnxruntime's cpuinfo library: a segfault on import). qemu opens an absolute path under its -L
# prefix first when the file exists there, so the prefix carries an ARM description of the cores.
_CPU = """processor\t: {n}
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""


def emulated_root(cores: int) -> Path:
    """The -L prefix: the cross toolchain's libraries (`lib`) and an ARM /proc/cpuinfo."""
    root = Path(tempfile.gettempdir()) / f"edgeprune-qemu-aarch64-{os.getuid()}-{cores}"
    cpuinfo = "".join(_CPU.format(n=n) for n in range(cores))
    if (root / "proc" / "cpuinfo").is_file() and (root / "proc" / "cpuinfo").read_text() == cpuinfo:
        return root
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as tmp:
        made = Path(tmp) / "root"
        (made / "proc").mkdir(parents=True)
        (made / "proc" / "cpuinfo").write_text(cpuinfo)
        if (SYSROOT / "lib").is_dir():
            (made / "lib").symlink_to(SYSROOT / "lib")
        shutil.rmtree(root, ignore_errors=True)
        try:
            made.rename(root)
        except OSError:  # another process made it first
            if not (root / "proc" / "cpuinfo").is_file():
                raise
    return root


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
        return [self.scheme, "-L", str(emulated_root(self.cores)), *argv]

    def exec(self, argv: list[str], what: str, stdin: bytes | Path | None = None,
             timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        return run_local(argv, what, stdin, timeout)
