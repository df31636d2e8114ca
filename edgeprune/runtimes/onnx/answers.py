"""ONNX Runtime's part of `verify`: the bundle's runner answers a fixed question greedily on the
device, on the bundle's own Python, and the host (onnxruntime here, the same ONNX file) reads that
answer: the device must have tokenized the prompt as the host does, and each answer token must be
within MAX_LOGIT_GAP of the host's best logit in its context (an answer that ends early ends on a
stop token that meets the same rule). The bundle's runner also times the SLO workload there
(`BundleRunner`), so a device needs no Python of its own."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeprune.devices.base import Device
from edgeprune.errors import EdgepruneError, VerificationFailed
from edgeprune.measure import BenchmarkRecord, Workload
from edgeprune.runtimes import worker
from edgeprune.runtimes.base import Agreement, AnswerCheck, Programs, Runner
from edgeprune.runtimes.onnx import runner, session
from edgeprune.runtimes.onnx.package import RUNNER_DIR, TOKENIZER, python_command, runner_command

log = logging.getLogger(__name__)

# The same ONNX Runtime on another instruction set rounds differently (MLAS kernels for NEON, not
# AVX2/AVX-512): under qemu-aarch64 the device's tokens were the host's best to 2.4e-6 of a logit
# (int4 with int8 compute, a logit spread of 12.9). A damaged model or runtime is logits away.
MAX_LOGIT_GAP = 0.1


def read_answer(model: Path, prompt: list[int], answer: list[int], stop: set[int], answer_tokens: int,
                threads: int, piece: Callable[[int], str] = str) -> Agreement:
    """The device's answer judged by the host's logits, teacher-forced on the device's own tokens;
    `piece`: a token's text, for the report."""
    result = Agreement(top_k=0, gap_allowed=MAX_LOGIT_GAP)
    if len(answer) > answer_tokens:
        result.failure = f"the device answered {len(answer)} tokens, more than the {answer_tokens} asked for"
        return result
    (logits,) = session.sequence_logits(model, np.array([prompt + answer]), threads)
    ended = len(answer) < answer_tokens  # on a stop token, which the runner does not print
    for k in range(len(answer) + ended):
        row = logits[len(prompt) - 1 + k]
        best = int(row.argmax())
        if k < len(answer):
            token, what = answer[k], repr(piece(answer[k]))
        else:
            token = max(stop, key=lambda t: row[t]) if stop else -1
            what = "its end of answer"
            if token < 0:
                result.failure = "the device's answer ended early, and the model has no stop token"
                return result
        gap = float(row[best] - row[token])
        result.positions += 1
        result.top1 += token == best
        if result.worst is None or gap > result.max_gap:
            result.max_gap = gap
            result.worst = {"token": k, "device": what, "host": piece(best), "gap": gap,
                            "rank": int((row > row[token]).sum()) + 1}
        if gap > MAX_LOGIT_GAP:
            result.failure = (f"at token {k} the device continues with {what}, {gap:.3f} logits below the host's "
                              f"best, {piece(best)!r} (tolerance {MAX_LOGIT_GAP})")
            return result
    return result


def check_answer(device: Device, programs: Programs, model: Path, prompt: str, answer_tokens: int,
                 threads: int) -> AnswerCheck:
    """The bundle's runner (in `programs.directory`, the bundle) answers `prompt` on `device` as the
    host would; VerificationFailed says where it parts."""
    from tokenizers import Tokenizer

    bundle = programs.directory
    config = json.loads((bundle / RUNNER_DIR / runner.CONFIG).read_text())
    stop = set(config["stop"])
    at = device.stage_tree(bundle)
    log.info("answering with the bundle's runner on %s", device.url)
    t0 = time.perf_counter()
    run = device.exec(device.tool([*runner_command(programs.arch, at), prompt, "--tokens", "-n", str(answer_tokens),
                                   "-t", str(threads)]), "the bundle's runner")
    seconds = time.perf_counter() - t0
    try:
        got = json.loads(run.stdout)
        device_prompt, answer, versions = list(got["prompt"]), list(got["answer"]), dict(got["versions"])
    except (ValueError, KeyError, TypeError):
        raise VerificationFailed(f"The bundle's runner on {device.url} printed no answer as JSON: "
                                 f"{run.stdout[:200]!r}.") from None
    tokenizer = Tokenizer.from_file(str(bundle / TOKENIZER))
    host_prompt = tokenizer.encode(runner.render(config["chat"], prompt), add_special_tokens=False).ids
    check = AnswerCheck(
        programs={"runner": ", ".join(f"{k} {v}" for k, v in versions.items())}, prompt=prompt,
        host_runtime=session.version(), device_text=tokenizer.decode(answer, skip_special_tokens=True),
        device_seconds=seconds)
    if device_prompt != host_prompt:
        raise VerificationFailed(f"The bundle's runner on {device.url} tokenized the question differently from the "
                                 "host (its tokenizer or runner is damaged); rebuild the bundle.")
    host_threads = min(threads, os.cpu_count() or 1)
    check.host_tokens = session.greedy(model, host_prompt, answer_tokens, host_threads, frozenset(stop))
    check.host_text = tokenizer.decode(check.host_tokens, skip_special_tokens=True)
    judged = read_answer(model, host_prompt, answer, stop, answer_tokens, host_threads,
                         lambda t: tokenizer.decode([t], skip_special_tokens=False))
    check.judge(judged, model, device.url, "the bundle's programs")
    log.info("device answer: %d tokens, %d the host's first choice, largest gap %.2g", judged.positions, judged.top1,
             judged.max_gap)
    return check


class BundleRunner(Runner):
    """The bundle's runner on the bundle's Python (`runner.py --bench`): the model timed alone, on
    what the device will run it with."""

    name = "bundle runner (onnxruntime)"

    def __init__(self, device: Device, programs: Programs) -> None:
        super().__init__(device)
        self.programs = programs

    def benchmark(self, model: Path, workload: Workload, baseline: Path | None = None) -> BenchmarkRecord:
        if baseline is not None:
            raise EdgepruneError("The bundle's runner times its own model alone, not beside a baseline.")
        device, bundle = self.device, self.programs.directory
        at = device.stage_tree(bundle)
        staged = f"{at}/{model.relative_to(bundle)}" if model.is_relative_to(bundle) else device.stage(model)
        request = worker.request(workload, staged, None, device.config.pin)
        run = device.exec(device.tool([*python_command(self.programs.arch, at), f"{at}/{RUNNER_DIR}", "--bench"]),
                          f"the benchmark of {model.name}", stdin=request)
        return worker.record(device, model, run.stdout, self.name)
