"""What CPU a machine has, as the kernel names it."""

from __future__ import annotations

from pathlib import Path


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (x86: model name; ARM: Hardware or CPU part)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    for key in ("model name", "Hardware", "CPU part"):
        for line in lines:
            if line.startswith(key) and ":" in line:
                return line.split(":", 1)[1].strip()
    return ""
