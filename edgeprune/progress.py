"""Progress bars that the CLI (or a library user) can silence in one place."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    # disable=None: tqdm also stays quiet when stderr is not a terminal (logs, CI).
    return tqdm(iterable, desc=desc, total=total, disable=None if _enabled else True, leave=False,
                dynamic_ncols=True)


def progress_bar(desc: str, total: float, unit: str) -> tqdm:
    """A bar the caller advances itself (`update`), e.g. by seconds of a time budget: its ETA is the budget's."""
    return tqdm(desc=desc, total=total, unit=unit, disable=None if _enabled else True, leave=False,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]")
