"""Where candidate builds run: in this process, or as tasks on a Ray cluster.

An executor runs a batch of `CandidateJob`s (executors/job.py) and yields what each reports as it
finishes; the outputs are in the stage cache. Executors register by subclassing with a `scheme`:
`--executor NAME[:ADDRESS]` picks one (`local`, `ray`, `ray:HOST:PORT`, `ray://HOST:PORT`). What
runs stays apart from where it runs: a strategy asks for a batch of candidates, the evaluator turns
them into jobs, the executor decides where each job runs. Device benchmarks are not an executor's:
a device is reached from the build (the fleet times on each device in parallel).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

from edgeprune.errors import EdgepruneError
from edgeprune.executors.job import BuildContext, Built, CandidateJob, this_machine


class Executor(ABC):
    scheme: ClassVar[str]
    registry: ClassVar[dict[str, type[Executor]]] = {}

    def __init_subclass__(cls, scheme: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.scheme = scheme
        Executor.registry[scheme] = cls

    @classmethod
    def check_address(cls, address: str | None) -> None:
        """Raise ValueError (one sentence) if `address` is not one this executor can reach."""
        if address is not None:
            raise ValueError(f"the {cls.scheme} executor takes no address")

    @abstractmethod
    def run(self, context: BuildContext, jobs: list[CandidateJob], threads: int) -> Iterator[Built]:
        """Run every job (each with up to `threads` threads); yield each one's report as it finishes."""

    def describe(self) -> str:
        return self.scheme

    def close(self) -> None:  # noqa: B027 (most executors hold nothing)
        """Let go of what the executor started or joined."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcess(Executor, scheme="local"):
    """One job after another, in the build's own process (the default)."""

    def __init__(self, address: str | None = None) -> None:
        pass

    def run(self, context: BuildContext, jobs: list[CandidateJob], threads: int) -> Iterator[Built]:
        for job in jobs:
            yield context.run(job, threads, this_machine())


def split_spec(spec: str) -> tuple[str, str | None]:
    """The scheme and the address: `ray://H:P` -> ("ray", "ray://H:P"), `ray:H:P` -> ("ray", "H:P"),
    `local` -> ("local", None)."""
    if "://" in spec:
        return spec.split("://", 1)[0], spec
    scheme, _, address = spec.partition(":")
    return scheme, address or None


def check_executor(spec: str) -> str:
    """The spec if it names a known executor and an address it accepts; else ValueError, one sentence."""
    scheme, address = split_spec(spec)
    if scheme not in Executor.registry:
        raise ValueError(f"'{spec}' is not an executor: use local, ray (a Ray started here, or the cluster "
                         "RAY_ADDRESS names), ray:HOST:PORT (a cluster's head, from one of its nodes) or "
                         "ray://HOST:PORT (a cluster's Ray Client server)")
    Executor.registry[scheme].check_address(address)
    return spec


def open_executor(spec: str) -> Executor:
    scheme, address = split_spec(check_executor(spec))
    try:
        return Executor.registry[scheme](address)
    except ValueError as e:
        raise EdgepruneError(f"Invalid --executor: {e}.") from None
