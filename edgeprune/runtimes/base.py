"""Runtime base classes: what runs a model file, apart from where it runs (`Device`).

A `Runtime` owns a model format and what follows from it: how a device times a file of that
format (`runner`), what one token reads and computes (`traffic`, for the latency model), whether
a device needs binaries built for it (`needs_binaries`), and what a bundle holds to run the model
on the target (`target_programs`, `package`, `card`), and how `verify` checks that a bundle's
programs answer on a device as the host would (`check_answer`). Runtimes register by subclassing,
under their `name`. A `Runner` is a runtime bound to one device: the device says how a command
runs there (a process here, ssh, an emulator), the runner what to run.

Stage keys hash the code an artifact came from, following imports; so this module imports no
runtime, and `edgeprune.runtimes.registry` is the one place that loads them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgeprune.errors import VerificationFailed
from edgeprune.runtimes.threads import thread_counts

if TYPE_CHECKING:
    from edgeprune.config import SearchSettings, Target
    from edgeprune.devices.base import Device
    from edgeprune.latency.traffic import ModelTraffic
    from edgeprune.measure import BenchmarkRecord, Workload
    from edgeprune.runtimes.artifacts import ModelFormat


@dataclass(frozen=True)
class Programs:
    """A directory of a runtime's programs, built for one architecture."""

    directory: Path
    arch: str


@dataclass
class Agreement:
    """A device's greedy answer as the host reads it: per token, the host's rank and logit gap."""

    top_k: int  # the host's ranks a device token may take (0: any, the gap alone decides)
    gap_allowed: float  # how far below the host's best logit it may be
    positions: int = 0  # device tokens judged, plus its end of text if it stopped early
    top1: int = 0  # of them, exactly the host's first choice
    max_gap: float = 0.0  # host's best logit minus the device token's, the largest over positions
    worst: dict[str, Any] | None = None  # the position of max_gap: token index, device and host pieces
    failure: str = ""  # why the answer is out of tolerance; empty if within it

    @property
    def passed(self) -> bool:
        return not self.failure


@dataclass
class AnswerCheck:
    """A bundle's programs on a device: each one starts, and a greedy answer there, read by the host."""

    programs: dict[str, str] = field(default_factory=dict)  # program -> first line of its banner
    prompt: str = ""
    host_runtime: str = ""  # the runtime and version the host read the answer with
    host_tokens: list[int] = field(default_factory=list)  # the host's own greedy answer
    host_text: str = ""
    device_text: str = ""
    agreement: dict[str, Any] = field(default_factory=dict)  # how the device's tokens rank on the host
    device_decode_runs: int | None = None  # the runtime's decode steps after the prompt
    device_decode_tok_s: float | None = None
    device_prefill_tok_s: float | None = None
    device_seconds: float = 0.0

    def judge(self, judged: Agreement, model: Path, url: str, programs: str) -> None:
        """Record how the host read the device's answer; VerificationFailed if out of tolerance."""
        self.agreement = asdict(judged)
        if not judged.passed:
            raise VerificationFailed(
                f"{model.name}: the device's greedy answer is not the host's within tolerance: {judged.failure}; "
                f"device {self.device_text!r}, host {self.host_text!r}; {programs} or the model do not run correctly "
                f"on {url}.")


class Runner(ABC):
    """A runtime on one device: times model files there."""

    name: ClassVar[str]  # what the report calls this way of timing ("llama-bench", "llama-cpp-python")

    def __init__(self, device: Device) -> None:
        self.device = device
        self.runtime: Runtime | None = None  # set when a runtime made it (`Runtime.runner`)

    @abstractmethod
    def benchmark(self, model: Path, workload: Workload, baseline: Path | None = None) -> BenchmarkRecord:
        """Run the workload on `model` (alternating with `baseline`, if given); raw and summarised timings."""


class Runtime(ABC):
    name: ClassVar[str]
    format: ClassVar[ModelFormat]  # how its model files are made and read
    quant_types: ClassVar[tuple[str, ...]]  # the quantization names its candidates take (`--quant`)
    default_quant: ClassVar[str]
    recipes: ClassVar[bool] = False  # whether llama.cpp's per-tensor recipes apply to its candidates
    families: ClassVar[tuple[str, ...] | None] = None  # the model families it runs (None: all of them)
    # Why a build searches it only when asked to (--runtime, a target's [runtime] table); None: always.
    opt_in: ClassVar[str | None] = None
    registry: ClassVar[dict[str, type[Runtime]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Runtime.registry[cls.name] = cls

    @abstractmethod
    def version(self) -> str:
        """The runtime's own name and version as this machine has it (for reports)."""

    def needs_binaries(self, device: Device) -> bool:
        """Whether timing on `device` runs programs built for its architecture (`runner(binaries=...)`)."""
        return False

    def runner(self, device: Device, binaries: Programs | None = None, ram_cap: int | None = None) -> Runner:
        """How `device` times this runtime's files; `binaries`: a directory of programs built for it;
        `ram_cap`: bytes past which a candidate's run is stopped and judged over the ceiling."""
        runner = self._runner(device, binaries, ram_cap)
        runner.runtime = self
        return runner

    @abstractmethod
    def _runner(self, device: Device, binaries: Programs | None, ram_cap: int | None) -> Runner: ...

    @abstractmethod
    def traffic(self, model: Path) -> ModelTraffic:
        """Bytes read and FLOPs per token of one model file."""

    def settings_space(self, cores: int) -> dict[str, tuple[Any, ...]]:
        """The runtime settings the search times on a device of `cores` cores, each with its values,
        the default first (`Workload.settings`)."""
        return {"threads": thread_counts(cores)}

    def settings_gap(self, settings: dict[str, Any], cores: int, model: Path) -> str | None:
        """Why the runtime cannot run `model` with `settings` (a combination `settings_space` allows), or None."""
        return None

    def lossy_settings(self, settings: dict[str, Any], cores: int) -> dict[str, Any]:
        """Those of `settings` that change the model's output beyond rounding (a quantized KV
        cache): the pick's quality is measured again when one is chosen."""
        return {}

    @abstractmethod
    def search_quant(self, settings: SearchSettings) -> str:
        """The quantization a profile's search gives this runtime's candidates."""

    def footprint_quant(self, quant: str) -> str:
        """The llama.cpp type of about the size of `quant`, for the memory preflight (which models
        llama.cpp's phases so far)."""
        return quant

    # -- the bundle: what runs the model on the target --------------------------------------

    def family_gap(self, family: str) -> str | None:
        """Why this runtime cannot run a model of `family`, or None."""
        if self.families is None or family in self.families:
            return None
        return f"edgeprune writes {', '.join(self.families)} models for {self.name} so far, not {family} models"

    @abstractmethod
    def check_target_programs(self, target: Target, cache_dir: Path) -> None:
        """Refuse now, before any work, if the target's programs can be neither found nor made here."""

    @abstractmethod
    def target_programs(self, target: Target, cache_dir: Path) -> Any:
        """The programs that run this runtime's files on the target (made once and cached)."""

    @abstractmethod
    def runnable(self, programs: Any, arch: str) -> Programs:
        """`target_programs`' output as a device of `arch` runs it (`runner(binaries=...)`)."""

    @abstractmethod
    def package(self, out: Path, model: str, target: Target, programs: Any, settings: dict[str, Any],
                tokenizer: Any) -> dict[str, Any]:
        """Put `programs` and the scripts that run `model` with `settings` (chosen by the search) into
        the bundle directory `out` (and `tokenizer`, a transformers tokenizer, if the model file does
        not hold its own); return the manifest's `toolchain`: how the programs were made, with at
        least `arch` and `runtime_version`."""

    @abstractmethod
    def bundle_programs(self, bundle: Path, arch: str) -> Programs:
        """The programs `package` put into `bundle`, as `check_answer` and `runner(binaries=...)` take them."""

    @abstractmethod
    def card(self, programs: Any) -> list[str]:
        """The model card's lines about the bundle's programs."""

    # -- verify: the bundle on a device ------------------------------------------------------

    @abstractmethod
    def check_answer(self, device: Device, programs: Programs, model: Path, prompt: str, answer_tokens: int,
                     threads: int) -> AnswerCheck:
        """The bundle's programs start on `device` and answer `prompt` greedily as the host would;
        raises VerificationFailed saying where they part."""

