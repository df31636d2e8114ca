"""Thread counts a runtime's settings are timed at. Imports nothing: llama.cpp's settings, which
model-making stages import, must not pull in the devices that time them (stage keys hash imports)."""

from __future__ import annotations


def thread_counts(cores: int) -> tuple[int, ...]:
    """Thread counts worth timing on `cores` cores, all cores first: every count up to 4, then
    all, all but one (room for the OS and the application), a half and a quarter."""
    if cores <= 4:
        return tuple(range(cores, 0, -1))
    return tuple(dict.fromkeys([cores, cores - 1, cores // 2, cores // 4]))
