"""llama.cpp as a runtime: GGUF files, timed by the Python worker (llama-cpp-python) where the
device has edgeprune's Python, else by the device's own llama-bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeprune.config import SearchSettings, Target
from edgeprune.devices.base import Device
from edgeprune.errors import EdgepruneError
from edgeprune.gguf_file import hparams, read_gguf
from edgeprune.latency.traffic import ModelTraffic
from edgeprune.quantize.llamacpp import QUANT_FTYPES
from edgeprune.runtimes import isolated, llamacpp
from edgeprune.runtimes.base import AnswerCheck, Programs, Runner, Runtime
from edgeprune.runtimes.llamacpp import answers, package, settings
from edgeprune.runtimes.llamacpp.gguf_format import GGUF
from edgeprune.runtimes.llamacpp.settings import LlamaSettings
from edgeprune.runtimes.llamacpp.tools import ToolsRunner
from edgeprune.runtimes.worker import WorkerRunner
from edgeprune.toolchain import Binaries, check_buildable, ensure_binaries, spec_for


class PythonRunner(WorkerRunner):
    """The Python worker: llama-cpp-python, pinned to as many cores as it has threads."""

    name = "llama-cpp-python"
    module = "edgeprune.runtimes.bench_worker"

    def crashed(self, returncode: int, model: Path) -> EdgepruneError:
        return isolated.crash(returncode, "benchmarking", model)


class LlamaCpp(Runtime):
    name = "llama.cpp"
    format = GGUF
    quant_types = tuple(QUANT_FTYPES)
    default_quant = "Q4_K_M"
    recipes = True

    def search_quant(self, settings: SearchSettings) -> str:
        return settings.quant

    def version(self) -> str:
        return llamacpp.version()

    def needs_binaries(self, device: Device) -> bool:
        return device.python is None

    def _runner(self, device: Device, binaries: Programs | None, ram_cap: int | None) -> Runner:
        if not self.needs_binaries(device):
            return PythonRunner(device, ram_cap)
        if binaries is None:
            raise EdgepruneError(f"{device.url} runs llama.cpp's own binaries, and none were given for it.")
        if ram_cap is not None:
            raise EdgepruneError(f"{device.url} cannot hold a run to a RAM cap; only local runs can.")
        return ToolsRunner(device, binaries)

    def traffic(self, model: Path) -> ModelTraffic:
        return ModelTraffic.from_gguf(model)

    # llama.cpp's programs for the target are cross-compiled from its source (toolchain/), once.
    def check_target_programs(self, target: Target, cache_dir: Path) -> None:
        check_buildable(spec_for(target), cache_dir)

    def target_programs(self, target: Target, cache_dir: Path) -> Binaries:
        return ensure_binaries(spec_for(target), cache_dir)

    def runnable(self, programs: Binaries, arch: str) -> Programs:
        return Programs(programs.bin, arch)

    def settings_space(self, cores: int) -> dict[str, tuple[Any, ...]]:
        return settings.space(cores)

    def settings_gap(self, chosen: dict[str, Any], cores: int, model: Path) -> str | None:
        try:
            run_as = LlamaSettings.of(chosen, cores)
        except ValueError as e:
            return str(e)
        shape = hparams(read_gguf(model))
        return run_as.kv_gap(shape.head_dim, shape.value_dim)

    def lossy_settings(self, chosen: dict[str, Any], cores: int) -> dict[str, Any]:
        return LlamaSettings.of(chosen, cores).lossy()

    def package(self, out: Path, model: str, target: Target, programs: Binaries, chosen: dict[str, Any],
                tokenizer: Any) -> dict[str, Any]:
        # The GGUF holds its tokenizer and chat template.
        return package.package(out, model, target, programs, LlamaSettings.of(chosen, target.hardware.cores))

    def bundle_programs(self, bundle: Path, arch: str) -> Programs:
        return Programs(bundle / package.BIN, arch)

    def card(self, programs: Binaries) -> list[str]:
        return package.card(programs)

    def check_answer(self, device: Device, programs: Programs, model: Path, prompt: str, answer_tokens: int,
                     threads: int) -> AnswerCheck:
        return answers.check_answer(device, programs, model, prompt, answer_tokens, threads)
