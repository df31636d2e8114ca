"""ONNX Runtime as a runtime: edgeprune's ONNX files, timed by the Python worker with onnxruntime's
engine (the cache bound on the runtime's side) on a device with edgeprune's Python; bundled with a
Python of the target's own (device_python.py) and the runner that answers on it (runner.py), which
`verify` runs and times on the device (answers.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeprune.config import SearchSettings, Target
from edgeprune.devices.base import Device
from edgeprune.errors import EdgepruneError
from edgeprune.latency.traffic import ModelTraffic
from edgeprune.runtimes.base import AnswerCheck, Programs, Runner, Runtime
from edgeprune.runtimes.onnx import answers, device_python, package
from edgeprune.runtimes.onnx.device_python import DevicePython
from edgeprune.runtimes.onnx.onnx_format import ONNX
from edgeprune.runtimes.onnx.traffic import onnx_traffic
from edgeprune.runtimes.onnx.weights import DEFAULT, WEIGHTS
from edgeprune.runtimes.worker import WorkerRunner


class OnnxWorkerRunner(WorkerRunner):
    name = "onnxruntime-python"
    module = "edgeprune.runtimes.bench_worker"


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    format = ONNX
    quant_types = tuple(WEIGHTS)
    default_quant = DEFAULT
    families = ("llama",)  # runtimes/onnx/llama.py writes Llama's layer: no biases or Q/K norms
    opt_in = ("searched only when asked for (--runtime onnxruntime, or a target's [runtime] table): beside "
              "llama.cpp it costs at least one more build (twice the candidates with the greedy strategy), and its "
              "bundle carries a Python for the device")

    def search_quant(self, settings: SearchSettings) -> str:
        return settings.onnx_quant

    def footprint_quant(self, quant: str) -> str:
        # int4 in blocks of 32 with a scale and a zero point is 5 bits a weight, int8 8.5 with its scales.
        return {"F32": "F32", "INT8": "Q8_0"}.get(quant, "Q4_K_M")

    def version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def _runner(self, device: Device, binaries: Programs | None, ram_cap: int | None) -> Runner:
        if binaries is not None:  # a bundle's own Python and runner
            return answers.BundleRunner(device, binaries)
        if device.python is None:
            raise EdgepruneError(f"{device.url} has no Python, and a build times ONNX Runtime candidates through "
                                 "edgeprune's Python worker: time them on a device with edgeprune installed.")
        return OnnxWorkerRunner(device, ram_cap)

    def traffic(self, model: Path) -> ModelTraffic:
        return onnx_traffic(model)

    # The target's programs: a Python of its architecture with onnxruntime, assembled once (device_python.py).
    def check_target_programs(self, target: Target, cache_dir: Path) -> None:
        device_python.check(target.hardware.arch)

    def target_programs(self, target: Target, cache_dir: Path) -> DevicePython:
        return device_python.device_python(target.hardware.arch, cache_dir)

    def runnable(self, programs: DevicePython, arch: str) -> Programs:
        raise EdgepruneError("ONNX Runtime candidates are timed by edgeprune's Python worker during a search, not "
                             "by a bundle's programs.")

    def package(self, out: Path, model: str, target: Target, programs: DevicePython, chosen: dict[str, Any],
                tokenizer: Any) -> dict[str, Any]:
        threads = int(chosen.get("threads", target.hardware.cores))
        return package.package(out, model, target, programs, threads, tokenizer)

    def bundle_programs(self, bundle: Path, arch: str) -> Programs:
        return Programs(bundle, arch)  # the runner finds the Python, the tokenizer and the model beside it

    def card(self, programs: DevicePython) -> list[str]:
        return package.card(programs)

    def check_answer(self, device: Device, programs: Programs, model: Path, prompt: str, answer_tokens: int,
                     threads: int) -> AnswerCheck:
        return answers.check_answer(device, programs, model, prompt, answer_tokens, threads)
