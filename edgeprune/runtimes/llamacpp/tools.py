"""Measuring with llama.cpp's own binaries on a device: llama-bench for timings, llama-completion
for a greedy answer. Used where the device has no Python (ssh, qemu) and by `verify`."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.devices.base import Device, DeviceError
from edgeprune.errors import EdgepruneError
from edgeprune.measure import BenchmarkRecord, Workload
from edgeprune.runtimes.base import Programs, Runner
from edgeprune.runtimes.llamacpp.settings import LlamaSettings

# POSIX sh, so it runs on a bare controller: start the program, poll its VmHWM (peak RSS) until it
# exits, report it on stderr. Polling misses nothing: VmHWM only grows while the process lives.
_PEAK_RSS_SH = r"""
"$@" &
pid=$!
peak=0
while :; do
  s=$(cat /proc/$pid/status 2>/dev/null) || break
  [ "$(printf '%s\n' "$s" | sed -n 's/^State:[[:space:]]*\(.\).*/\1/p')" = Z ] && break
  v=$(printf '%s\n' "$s" | sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p')
  [ -n "$v" ] && peak=$v
  sleep 0.05 2>/dev/null || sleep 1
done
wait $pid
rc=$?
echo "edgeprune-peak-rss-kib $peak" >&2
exit $rc
"""
_PEAK = re.compile(r"^edgeprune-peak-rss-kib (\d+)$", re.M)
_EVAL = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second")
_PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens.*?([\d.]+) tokens per second")
_END_OF_TEXT = b" [end of text]\n"


def run_with_peak_rss(device: Device, argv: list[str], what: str) -> tuple[str, str, int]:
    """stdout, stderr (without the wrapper's line) and peak RSS in bytes of one program run."""
    proc = device.exec(["sh", "-c", _PEAK_RSS_SH, "edgeprune-peak-rss", *device.tool(argv)], what)
    stderr = proc.stderr.decode(errors="replace")
    m = _PEAK.search(stderr)
    return proc.stdout.decode(errors="replace"), _PEAK.sub("", stderr), int(m.group(1)) * 1024 if m else 0


def _bench_once(device: Device, bench: str, model: str, workload: Workload,
                settings: LlamaSettings) -> tuple[dict[str, float], list, int]:
    n, m = len(workload.prompt), workload.answer_tokens
    argv = [bench, "-m", model, "-p", str(n), "-n", str(m), "-pg", f"{n},{m}", "-r", "1", *settings.cli_args(),
            "-o", "jsonl", "--no-warmup"]
    out, _, peak = run_with_peak_rss(device, argv, "llama-bench")
    try:
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        by_shape = {(r["n_prompt"], r["n_gen"]): r["samples_ns"][0] / 1e9 for r in records}
        prefill_s, decode_s, latency_s = by_shape[(n, 0)], by_shape[(0, m)], by_shape[(n, m)]
    except (ValueError, KeyError, IndexError) as e:
        raise DeviceError(
            f"llama-bench on {device.url} printed no usable result ({e}); run it by hand to see why.") from None
    # llama-bench prompts with random tokens; timings depend on counts, not on which tokens.
    run = {"ttft_s": prefill_s, "latency_s": latency_s, "prefill_tok_s": n / prefill_s, "decode_tok_s": m / decode_s}
    return run, records, peak


@dataclass
class Completion:
    output: bytes  # the answer exactly as llama-completion prints it
    text: str  # the same, decoded (a character cut by the last token shows as U+FFFD)
    decode_runs: int | None  # llama.cpp's eval count after the prompt
    decode_tok_s: float | None
    prefill_tok_s: float | None
    seconds: float


class ToolsRunner(Runner):
    """llama.cpp's own binaries, built for the device's architecture, run there."""

    name = "llama-bench"

    def __init__(self, device: Device, binaries: Programs) -> None:
        super().__init__(device)
        if binaries.arch != device.arch:
            raise EdgepruneError(f"The llama.cpp binaries in {binaries.directory} are built for {binaries.arch}, but "
                                 f"{device.url} is {device.arch}; build them for the device's architecture.")
        self.binaries = binaries.directory

    def tool_path(self, name: str) -> str:
        return self.device.stage(self.binaries / name, executable=True)

    def benchmark(self, model: Path, workload: Workload, baseline: Path | None = None) -> BenchmarkRecord:
        """llama-bench with the SLO's prompt and answer lengths; one invocation per repetition so the
        candidate and the baseline alternate, as the Python runner alternates them."""
        device = self.device
        bench = self.tool_path("llama-bench")
        paths = [device.stage(model)] + ([device.stage(baseline)] if baseline else [])
        settings = [LlamaSettings.of(workload.settings, workload.threads),
                    LlamaSettings.of(workload.baseline_settings, workload.threads)]
        runs: list[list[dict[str, float]]] = [[] for _ in paths]
        raw: list[dict[str, Any]] = []
        peak, timed = 0, 0.0
        t0 = time.perf_counter()
        for i in range(workload.warmup + workload.repetitions):
            for k, path in enumerate(paths):
                run, records, rss = _bench_once(device, bench, path, workload, settings[k])
                timed += sum(r["samples_ns"][0] for r in records) / 1e9
                if k == 0:
                    peak = max(peak, rss)
                if i >= workload.warmup:
                    runs[k].append(run)
                    raw += [r | {"edgeprune_model": "baseline" if k else "candidate"} for r in records]
        first = raw[0] if raw else {}
        invocations = len(paths) * (workload.warmup + workload.repetitions)
        return BenchmarkRecord(
            device=device.url,
            runs=runs[0],
            baseline_runs=runs[1] if baseline else [],
            peak_rss_bytes=peak,
            # Not reported by llama-bench: wall time left over after the timed tests, per invocation.
            load_s=max(0.0, (time.perf_counter() - t0 - timed) / invocations),
            threads=settings[0].threads,
            runtime=f"llama.cpp {first.get('build_commit', '?')} (build {first.get('build_number', '?')}), llama-bench",
            system_info=f"backends {first.get('backends', '?')}",
            runner="llama-bench",
            cpu=first.get("cpu_info") or device.cpu,
            emulated=device.emulated,
            raw=raw,
        )

    def greedy_completion(self, model: Path, prompt: str, answer_tokens: int, threads: int) -> Completion:
        """The device's greedy answer to `prompt` from its own llama-completion."""
        device = self.device
        t0 = time.perf_counter()
        argv = [self.tool_path("llama-completion"), "-m", device.stage(model), "-p", prompt, "-n", str(answer_tokens),
                "--temp", "0", "--seed", "0", "-t", str(threads), "-c", str(answer_tokens + 256), "-no-cnv",
                "--no-display-prompt", "--simple-io", "--no-warmup"]
        proc = device.exec(device.tool(argv), "llama-completion")
        stderr = proc.stderr.decode(errors="replace")
        # llama-completion ends its output with " [end of text]\n" after an end-of-generation token, then "\n\n".
        output = proc.stdout.removesuffix(b"\n\n").removesuffix(_END_OF_TEXT)
        text = output.decode("utf-8", errors="replace")
        result = Completion(output, text, None, None, None, time.perf_counter() - t0)
        if m := _EVAL.search(stderr):
            result.decode_runs, result.decode_tok_s = int(m.group(2)), float(m.group(3))
        if m := _PROMPT_EVAL.search(stderr):
            result.prefill_tok_s = float(m.group(3))
        return result

    def banner(self, name: str) -> str:
        """The first line a tool prints for --version (--help for llama-bench): proof that it starts."""
        flag = "--help" if name == "llama-bench" else "--version"
        proc = self.device.exec(self.device.tool([self.tool_path(name), flag]), f"{name} {flag}")
        out = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
        return out[0] if out else ""
