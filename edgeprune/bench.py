"""`edgeprune bench MODEL --target T`: one model file (a GGUF, or an ONNX file), the target's SLO
workload, on its device, through the runtime that runs that kind of file."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.config import Target
from edgeprune.errors import EdgepruneError
from edgeprune.fleet import open_fleet
from edgeprune.latency import LatencyModel, ModelTraffic, Observation, host_profile, roofline_fraction
from edgeprune.measure import BenchmarkRecord, Workload
from edgeprune.runtimes import llamacpp
from edgeprune.runtimes.artifacts import ModelFormat
from edgeprune.runtimes.base import Runtime
from edgeprune.runtimes.registry import get_runtime, runtime_for
from edgeprune.search.budget import Budget

log = logging.getLogger(__name__)

# The prompt the Python runner feeds (llama-bench draws its own tokens): real prose, as a user's
# question would be, repeated to the SLO's length.
PROSE = ("The control room of the bottling plant logs every valve, pump and conveyor once a second. When a "
         "pressure reading drifts outside its band, the operator asks the assistant what changed in the last "
         "hour, which sensors agree, and what the maintenance manual says about the pump in question. ")


@dataclass
class BenchResult:
    model: Path
    target: str
    device: str
    arch: str
    record: BenchmarkRecord
    budget: Budget
    verdict: str
    notes: list[str] = field(default_factory=list)
    # decode tok/s as a share of bandwidth / bytes read per token, and whose bandwidth that is
    roofline: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None  # the target's latency transferred from this measurement
    size_bytes: int = 0  # every file the model is made of

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.model), "size_bytes": self.size_bytes, "target": self.target, "device": self.device,
                "arch": self.arch,
                "budget": self.budget.to_dict(), "verdict": self.verdict, "notes": self.notes,
                "roofline": self.roofline, "estimate_on_target": self.estimate, "benchmark": self.record.to_dict()}


# Where an ONNX file's tokenizer is: beside it in a bundle, in the HF checkpoint `prune` writes.
TOKENIZERS = ("tokenizer.json", "hf/tokenizer.json")


def prompt_tokens(model: Path, fmt: ModelFormat, n: int, baseline: Path | None = None) -> tuple[int, ...]:
    """PROSE as `model`'s tokens, repeated to n (after the GGUF's BOS)."""
    if not fmt.vocabulary_inside:
        found = next((model.parent / t for t in TOKENIZERS if (model.parent / t).is_file()), None)
        if found is not None:
            from tokenizers import Tokenizer

            body = Tokenizer.from_file(str(found)).encode(PROSE, add_special_tokens=False).ids
            return tuple((body * (n // len(body) + 1))[:n])
        if baseline is None:
            raise EdgepruneError(f"{model} has no tokenizer beside it ({' or '.join(TOKENIZERS)}): give --baseline "
                                 "UNPRUNED.gguf, whose vocabulary the prompt is then written in.")
        model = baseline
    tokens = llamacpp.tokenize(model, PROSE)
    bos, body = tokens[:1], tokens[1:]
    return tuple((bos + body * (n // len(body) + 1))[:n])


def _check_files(model: Path, baseline: Path | None, runtime: Runtime) -> None:
    """A missing or broken file is one sentence here, not a runner's traceback."""
    if baseline is not None:
        baseline_runtime = get_runtime()  # the unpruned model is timed with the default runtime
        if baseline.suffix != baseline_runtime.format.suffix:
            raise EdgepruneError(f"--baseline {baseline} is not a {baseline_runtime.format.name.upper()}: the unpruned "
                                 f"model is timed with {baseline_runtime.name}.")
        baseline_runtime.format.check(baseline)
    runtime.format.check(model)


def bench(model: Path, target: Target, cache_dir: Path, baseline: Path | None = None, repetitions: int = 5,
          warmup: int = 1) -> BenchResult:
    runtime = runtime_for(model)
    _check_files(model, baseline, runtime)
    slo = target.slo
    with open_fleet(target, cache_dir, [runtime], judging=False) as fleet:
        timer = fleet.primary[runtime.name]
        device = timer.device
        threads = min(target.hardware.cores, device.cores)
        prompt = prompt_tokens(model, runtime.format, slo.prompt_tokens, baseline)
        workload = Workload(prompt, slo.answer_tokens, threads, warmup, repetitions)
        log.info("timing %s on %s: %d-token prompt + %d-token answer, %d threads, %d runs", model.name, device.url,
                 slo.prompt_tokens, slo.answer_tokens, threads, repetitions)
        record = timer.benchmark(model, workload, baseline)
        arch = device.arch
        local = device.url == "local"
    # A speed-up needs the unpruned model timed alongside: judged only when one is given.
    budget = Budget.from_slo(slo)
    notes = []
    if baseline is None and budget.speedup is not None:
        budget = Budget(budget.latency_s, None, budget.ram_bytes)
        notes.append(f"The SLO's {slo.speedup:g}x speed-up is not judged: give --baseline UNPRUNED.gguf to time the "
                     "unpruned model alongside.")
    if budget.latency_s is None and budget.speedup is None and budget.ram_bytes is None:
        verdict = "no criterion to judge"
    else:
        verdict = budget.verdict(record)
    if record.emulated:
        notes.append(f"{target.device.url} is emulated: these timings prove the binaries run, not the target's speed.")
    elif arch != target.hardware.arch:
        notes.append(f"Measured on {arch}, a stand-in for the {target.hardware.arch} target: the verdict is this "
                     "device's, not the target's.")
    result = BenchResult(model, target.name, target.device.url, arch, record, budget, verdict, notes,
                         size_bytes=runtime.format.size_bytes(model))
    if not record.emulated and record.runs:
        _physical_limits(result, runtime.traffic(model), workload, cache_dir, local, target)
    return result


def _physical_limits(result: BenchResult, traffic: ModelTraffic, workload: Workload, cache_dir: Path, local: bool,
                     target: Target) -> None:
    """The roofline line, and for a stand-in the target's latency estimated from this measurement.
    Here the bandwidth is measured (a streaming read, cached); elsewhere it is the target file's."""
    decode = result.record.summary["decode_tok_s_p50"]
    context = len(workload.prompt) + workload.answer_tokens // 2  # the mean K/V length while decoding
    if local:
        host = host_profile(cache_dir, workload.threads)
        bandwidth, source = host.bandwidth_gbs, f"measured streaming read, {workload.threads} thread(s)"
    else:
        bandwidth, source = target.hardware.memory_bandwidth_gbs, f"the target file's figure for {target.name}"
    result.roofline = {"fraction": roofline_fraction(decode, traffic, bandwidth, context), "bandwidth_gbs": bandwidth,
                       "bandwidth_source": source, "bytes_per_token": traffic.decode_bytes(context),
                       "roofline_tok_s": bandwidth * 1e9 / traffic.decode_bytes(context)}
    if local and (result.arch != target.hardware.arch or target.hardware.cores != workload.threads):
        measured = LatencyModel.for_host(host).fitted([Observation.from_record(traffic, workload, result.record)])
        prediction = measured.transfer(target.hardware, name=f"target {target.name}").predict(
            traffic, len(workload.prompt), workload.answer_tokens)
        result.estimate = prediction.to_dict() | {"description": prediction.describe()}
