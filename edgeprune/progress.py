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
    return tqdm(iterable, desc=desc, total=total, disable=not _enabled, leave=False, dynamic_ncols=True)
