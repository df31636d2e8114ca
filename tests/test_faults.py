"""Fault cases: what edgeprune does when the world misbehaves. One section per kind of fault."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from test_cli import assert_clean_error

from edgeprune.devices import get_device
from edgeprune.errors import EdgepruneError, RuntimeCrash
from edgeprune.export import Provenance, export_gguf
from edgeprune.measure import Workload
from edgeprune.models.embedded import embedded_gguf
from edgeprune.quantize import quantize
from edgeprune.runtimes import isolated, llamacpp

# --- crash in the runtime: llama.cpp dies of a signal in its child process -------------------------------------------

ISOLATED = "edgeprune.runtimes.isolated"
DOCTOR = "run `edgeprune doctor` to check the runtime build."


def _kill_child(parent: int, module: str, sig: int, running: Callable[[], bool],
                armed: Callable[[], bool] = lambda: True) -> int | None:
    """Send `sig` to the first `python -m module` process under `parent` seen once `armed()`; its pid."""
    while running():
        if armed():
            for child in psutil.Process(parent).children(recursive=True):
                try:
                    if module in child.cmdline():
                        os.kill(child.pid, sig)
                        return child.pid
                except psutil.Error:  # it ended meanwhile
                    continue
        time.sleep(0.005)
    return None


def test_isolated_calls_return_results_and_stream_items_from_another_process(tmp_path):
    path = tmp_path / "m.gguf"
    np.testing.assert_array_equal(isolated.call("testing", path, np.arange, 5), np.arange(5))
    assert isolated.call("testing", path, os.getpid) != os.getpid()
    assert list(isolated.stream("testing", path, range, 3)) == [0, 1, 2]


def test_exceptions_in_the_child_come_back_with_their_type_and_message(tmp_path):
    with pytest.raises(EdgepruneError, match=r"^llama.cpp cannot load missing.gguf: ") as e:
        isolated.call("testing", tmp_path, llamacpp.load, tmp_path / "missing.gguf", 8, 1)
    assert type(e.value) is EdgepruneError
    with pytest.raises(ValueError, match=r"^invalid literal for int\(\) with base 10: 'x'$"):
        isolated.call("testing", tmp_path, int, "x")
    # A crash two processes down (verify's answer runs llama.cpp's generation in its own child) stays a crash.
    with pytest.raises(RuntimeCrash, match=r"\(SIGABRT\) while generating .*inner\.gguf: "):
        isolated.call("answering", tmp_path / "outer.gguf", isolated.call, "generating", tmp_path / "inner.gguf",
                      os.abort)


def test_an_exception_that_does_not_pickle_keeps_its_type_name_and_message():
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a} and {b}")

    class OddUserError(EdgepruneError):
        def __init__(self, name: str) -> None:
            super().__init__(f"Bad {name}; fix it.")

    odd = isolated.rebuild(*isolated.portable(Odd(1, 2)))
    assert type(odd) is RuntimeError and str(odd) == "Odd: 1 and 2"
    user = isolated.rebuild(*isolated.portable(OddUserError("input")))
    assert type(user) is EdgepruneError and str(user) == "Bad input; fix it."


def test_log_records_of_the_child_reach_the_parents_loggers(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    isolated.call("testing", tmp_path, logging.getLogger("edgeprune.faults").warning, "%d windows left", 3)
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("edgeprune.faults", "WARNING", "3 windows left")]


@pytest.mark.parametrize(("fn", "args", "name"), [
    (ctypes.string_at, (0,), "SIGSEGV"),  # a real null-pointer read
    (os.abort, (), "SIGABRT"),
    (signal.raise_signal, (signal.SIGILL,), "SIGILL"),
    (signal.raise_signal, (signal.SIGBUS,), "SIGBUS"),
])
def test_a_signal_in_the_child_is_one_sentence_naming_the_work_the_model_and_the_signal(tmp_path, fn, args, name):
    model = tmp_path / "model.gguf"
    with pytest.raises(RuntimeCrash) as e:
        isolated.call("measuring the quality of", model, fn, *args)
    assert str(e.value) == f"llama.cpp crashed ({name}) while measuring the quality of {model}: {DOCTOR}"


def test_a_child_killed_by_the_oom_killer_says_memory_and_an_exit_code_is_named(tmp_path):
    model = tmp_path / "model.gguf"
    with pytest.raises(RuntimeCrash, match=rf"^llama.cpp was killed \(SIGKILL\) while quantizing {model}: most likely "
                                           r"the machine ran out of memory"):
        isolated.call("quantizing", model, signal.raise_signal, signal.SIGKILL)
    with pytest.raises(RuntimeCrash, match=rf"^llama.cpp's process exited with code 3 while quantizing {model} "
                                           r"\(no output\): "):
        isolated.call("quantizing", model, os._exit, 3)


def test_a_stream_abandoned_early_ends_its_child(tmp_path):
    logits = llamacpp.sequence_logits(embedded_gguf(), np.array([[1, 504, 2432, 28]] * 50), threads=1)
    assert next(logits).shape == (4, 49152)
    child = next(c for c in psutil.Process().children() if ISOLATED in c.cmdline())
    logits.close()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_a_benchmark_worker_killed_by_a_signal_is_a_runtime_crash():
    model = embedded_gguf()
    workload = Workload(prompt=tuple(range(100, 116)), answer_tokens=4, threads=1, warmup=0, repetitions=1)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get_device("local").benchmark, model, workload)
        killed = _kill_child(os.getpid(), "edgeprune.runtimes.bench_worker", signal.SIGSEGV, lambda: not future.done())
        assert killed is not None
        with pytest.raises(RuntimeCrash) as e:
            future.result()
    assert str(e.value) == f"llama.cpp crashed (SIGSEGV) while benchmarking {model}: {DOCTOR}"


@pytest.mark.slow
def test_a_quantizer_killed_mid_write_leaves_neither_its_output_nor_its_temporary_file(
        tmp_path, embedded_reference, embedded_tokenizer_spec):
    src, dst = tmp_path / "model-f16.gguf", tmp_path / "model-q4km.gguf"
    export_gguf(embedded_reference.model, embedded_tokenizer_spec, src, "F16", Provenance("e", "0" * 64, {}), "e")
    partial = dst.with_name(dst.name + ".tmp")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(quantize, src, dst, "Q4_K_M", 1)
        killed = _kill_child(os.getpid(), ISOLATED, signal.SIGBUS, lambda: not future.done(), partial.exists)
        with pytest.raises(RuntimeCrash) as e:
            future.result()
    assert killed is not None
    assert str(e.value) == f"llama.cpp crashed (SIGBUS) while quantizing {src}: {DOCTOR}"
    assert sorted(tmp_path.iterdir()) == [src]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "doing"), [("quantize", "quantizing"), ("quality", "measuring the quality of")])
def test_a_runtime_crash_ends_prune_with_one_sentence_exit_2_and_nothing_half_written(
        tmp_path, embedded_reference, stage, doing):
    from conftest import tiny_llama

    model_dir = tmp_path / "tiny-llama"
    tiny_llama(tied=False).save_pretrained(model_dir)
    embedded_reference.tokenizer.save_pretrained(model_dir)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"Pump {i} reported {i * 7 % 90} bar at {i % 24}:00. " * 8})
                               for i in range(50)))
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    cli = subprocess.Popen([sys.executable, "-m", "edgeprune", "prune", "--plan", str(plan), "--model", str(model_dir),
                            "--calib", str(calib), "-p", "quick", "-o", str(out), "--cache-dir", str(cache), "-q"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    quantized = lambda: any(cache.glob("stages/candidate-model/*/result.json"))  # noqa: E731
    # The candidate's quantizer is the first llama.cpp process (and has ended when the candidate's stage is
    # complete); its quality measurement the first after it.
    killed = _kill_child(cli.pid, ISOLATED, signal.SIGSEGV, lambda: cli.poll() is None,
                         quantized if stage == "quality" else lambda: True)
    stdout, stderr = cli.communicate(timeout=600)
    assert killed is not None, stderr
    assert cli.returncode == 2
    assert_clean_error(subprocess.CompletedProcess(cli.args, cli.returncode, stdout, stderr),
                       f"llama.cpp crashed (SIGSEGV) while {doing} ", DOCTOR)
    assert not out.exists()
    assert [p for p in cache.rglob("*") if ".tmp" in p.name] == []
    assert quantized() == (stage == "quality")
    assert not any(cache.glob("stages/quality/*/result.json"))
