"""A fleet: several devices of the same hardware timing candidates in parallel.

A target's `[device] urls` lists them. Each candidate is timed on one device, alongside the
unpruned model on that same device: the speed-up stays a ratio of runs taken side by side on one
machine. A device that stops answering once its own reconnection attempts are spent (`retries`)
is dropped for the rest of the build, and what it was timing goes back in the queue for the
others; the build stops only when no device is left. A program failing on a device is an error,
as it would be on one device. One device is a fleet of one: the same code path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from edgeprune.config import Target
from edgeprune.devices import Device, DeviceError, DeviceUnreachable, get_device
from edgeprune.devices.local import LocalDevice
from edgeprune.errors import EdgepruneError
from edgeprune.events import DEVICE, warning_event
from edgeprune.runtimes.base import Runner, Runtime

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Member:
    """One device of the fleet: how it times each runtime's files (by runtime name)."""
    timers: dict[str, Runner]

    @property
    def url(self) -> str:
        return next(iter(self.timers.values())).device.url


class Fleet:
    def __init__(self, members: list[dict[str, Runner]]) -> None:
        if not members:
            raise ValueError("a fleet has at least one device")
        self.members = [Member(t) for t in members]
        self.dropped: dict[str, str] = {}  # url -> why

    @property
    def live(self) -> list[Member]:
        return [m for m in self.members if m.url not in self.dropped]

    @property
    def primary(self) -> dict[str, Runner]:
        """The first device still in the fleet: it times what is timed one at a time."""
        live = self.live
        if not live:
            raise DeviceError(self._all_gone())
        return live[0].timers

    @property
    def size(self) -> int:
        return len(self.live)

    def _all_gone(self) -> str:
        why = "; ".join(f"{url}: {reason}" for url, reason in self.dropped.items())
        return f"Every device of the fleet dropped out ({why}); built candidates are cached, so the same " \
               "command resumes once a device answers again."

    def _drop(self, member: Member, error: DeviceError) -> None:
        self.dropped[member.url] = str(error)
        warning_event(log, DEVICE, "%s dropped out of the fleet (%s); %d device(s) left, its work re-queued",
                      member.url, error, self.size, url=member.url, phase="dropped", reason=str(error),
                      left=self.size)

    def map(self, fn: Callable[[dict[str, Runner], T], R], items: list[T]) -> list[R]:
        """`fn(timers, item)` for every item, each on one device, the devices in parallel (a device
        takes the next item when it is free); results in the items' order."""
        results: dict[int, R] = {}
        pending = deque(range(len(items)))
        lock = threading.Lock()
        failure: list[BaseException] = []

        def work(member: Member) -> None:
            while True:
                with lock:
                    if failure or member.url in self.dropped or not pending:
                        return
                    i = pending.popleft()
                try:
                    result = fn(member.timers, items[i])
                except DeviceUnreachable as e:
                    with lock:
                        pending.appendleft(i)
                        if len(self.members) == 1:  # nothing to fall back on: the error as it is
                            failure.append(e)
                        else:
                            self._drop(member, e)
                    return
                except BaseException as e:  # noqa: BLE001 (re-raised in the calling thread)
                    with lock:
                        failure.append(e)
                    return
                with lock:
                    results[i] = result

        while pending and not failure:
            live = self.live[: len(pending)]
            if not live:
                raise DeviceError(self._all_gone())
            if len(live) == 1:
                work(live[0])
                continue
            threads = [threading.Thread(target=work, args=(m,), name=f"fleet-{m.url}") for m in live]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if failure:
            raise failure[0]
        return [results[i] for i in range(len(items))]


def _timers(device: Device, target: Target, cache_dir: Path, runtimes: list[Runtime],
            judging: bool) -> dict[str, Runner]:
    """How `device` times each runtime's models (by runtime name): its programs for the device's
    architecture where it runs them (built once and cached), the RAM cap where asked for."""
    if judging and device.emulated:
        raise EdgepruneError(
            f"{device.url} times under emulation, which cannot judge a budget: search on local or ssh://, then "
            "check the bundle with `edgeprune verify BUNDLE --device qemu-aarch64`.")
    cap = None
    if isinstance(device, LocalDevice) and target.device.ram_cap:
        cap = int(target.slo.ram_ceiling_gib * (1 << 30))
    timers = {}
    for runtime in runtimes:
        programs = None
        if runtime.needs_binaries(device):
            if device.arch != target.hardware.arch:
                raise EdgepruneError(
                    f"{device.url} is {device.arch} and target {target.name} is {target.hardware.arch}: the "
                    f"target's {runtime.name} build cannot run there; measure on a device of the target's "
                    "architecture.")
            programs = runtime.runnable(runtime.target_programs(target, cache_dir), target.hardware.arch)
        timers[runtime.name] = runtime.runner(device, programs, cap)
    return timers


@contextlib.contextmanager
def open_fleet(target: Target, cache_dir: Path, runtimes: list[Runtime], judging: bool = True) -> Iterator[Fleet]:
    """The target's device, or devices: a fleet's unreachable devices are left out (with a warning)
    as long as one answers. `judging`: the timings will decide a budget, which an emulator's cannot."""
    urls = target.device.fleet
    with contextlib.ExitStack() as stack:
        members: list[dict[str, Runner]] = []
        unreachable: dict[str, str] = {}
        for config in target.device.members():
            device = stack.enter_context(get_device(config))
            try:
                members.append(_timers(device, target, cache_dir, runtimes, judging))
            except DeviceUnreachable as e:
                if len(urls) == 1:
                    raise
                unreachable[config.url] = str(e)
                warning_event(log, DEVICE, "%s left out of the fleet: %s", config.url, e, url=config.url,
                              phase="unreachable", reason=str(e))
        if not members:
            raise DeviceError(f"No device of the fleet answers: {'; '.join(unreachable.values())}")
        first = next(iter(members[0].values())).device
        for timers in members[1:]:
            other = next(iter(timers.values())).device
            if (other.arch, other.cores) != (first.arch, first.cores):
                raise EdgepruneError(
                    f"{other.url} is {other.arch} with {other.cores} cores and {first.url} {first.arch} with "
                    f"{first.cores}: a fleet's devices must be the same hardware (their timings make one search); "
                    f"list devices of one kind in target {target.name}'s [device] urls.")
        fleet = Fleet(members)
        fleet.dropped.update(unreachable)
        yield fleet
