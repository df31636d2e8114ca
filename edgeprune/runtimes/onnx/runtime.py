"""ONNX Runtime as a runtime: edgeprune's ONNX files, timed by the Python worker with
onnxruntime's engine (the cache bound on the runtime's side). Devices without Python, and bundles,
are not served yet: each is refused in one sentence before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeprune.config import SearchSettings, Target
from edgeprune.devices.base import Device
from edgeprune.errors import EdgepruneError
from edgeprune.latency.traffic import ModelTraffic
from edgeprune.runtimes.base import AnswerCheck, Programs, Runner, Runtime
from edgeprune.runtimes.onnx.onnx_format import ONNX
from edgeprune.runtimes.onnx.traffic import onnx_traffic
from edgeprune.runtimes.onnx.weights import DEFAULT, WEIGHTS
from edgeprune.runtimes.worker import WorkerRunner

NO_BUNDLE = ("ONNX Runtime candidates cannot be bundled for a device yet (its programs for the target are not "
             "packaged): build with the llama.cpp runtime")


class OnnxWorkerRunner(WorkerRunner):
    name = "onnxruntime-python"
    module = "edgeprune.runtimes.bench_worker"


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    format = ONNX
    quant_types = tuple(WEIGHTS)
    default_quant = DEFAULT
    families = ("llama",)  # runtimes/onnx/llama.py writes Llama's layer: no biases or Q/K norms

    def search_quant(self, settings: SearchSettings) -> str:
        return settings.onnx_quant

    def footprint_quant(self, quant: str) -> str:
        # int4 in blocks of 32 with a scale and a zero point is 5 bits a weight, int8 8.5 with its scales.
        return {"F32": "F32", "INT8": "Q8_0"}.get(quant, "Q4_K_M")

    def bundle_gap(self, target: Target) -> str | None:
        return NO_BUNDLE

    def version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def _runner(self, device: Device, binaries: Programs | None, ram_cap: int | None) -> Runner:
        if device.python is None:
            raise EdgepruneError(f"{device.url} has no Python, and ONNX Runtime models are timed only through "
                                 "edgeprune's Python worker so far: time them on a device with edgeprune installed.")
        return OnnxWorkerRunner(device, ram_cap)

    def traffic(self, model: Path) -> ModelTraffic:
        return onnx_traffic(model)

    def check_target_programs(self, target: Target, cache_dir: Path) -> None:
        raise EdgepruneError(NO_BUNDLE + ".")

    def target_programs(self, target: Target, cache_dir: Path) -> Any:
        raise EdgepruneError(NO_BUNDLE + ".")

    def runnable(self, programs: Any, arch: str) -> Programs:
        raise EdgepruneError(NO_BUNDLE + ".")

    def package(self, out: Path, model: str, target: Target, programs: Any, settings: dict[str, Any]) -> dict[str, Any]:
        raise EdgepruneError(NO_BUNDLE + ".")

    def card(self, programs: Any) -> list[str]:
        raise EdgepruneError(NO_BUNDLE + ".")

    def check_answer(self, device: Device, programs: Programs, model: Path, prompt: str, answer_tokens: int,
                     threads: int) -> AnswerCheck:
        raise EdgepruneError(NO_BUNDLE + ", so there is nothing of it to verify.")
