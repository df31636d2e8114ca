"""The ONNX Runtime bundle's program (runtimes/onnx/runner.py), installed into a directory as a bundle
carries it: on the host's Python it answers what session.greedy answers; on the device's own Python
under qemu-aarch64 each answer token is the host's best within rounding."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_llama, tiny_tokenizer
from edgeprune.devices import get_device
from edgeprune.export import Provenance
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import Plan
from edgeprune.runtimes.onnx import device_python, runner, session
from edgeprune.runtimes.onnx.llama import write_onnx
from edgeprune.runtimes.onnx.weights import WEIGHTS

VOCAB = 512
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    plan = Plan(heads=((0, (0, 2)), (1, (2, 3))), ffn=((1, tuple(range(0, 128, 2))),))
    write_onnx(ModuleStore(tiny_llama(tied=False, vocab=VOCAB)), plan, root / "model.onnx", WEIGHTS["INT4"],
               Provenance("tiny", "0" * 64, plan.to_dict()), "tiny")
    tokenizer = tiny_tokenizer(VOCAB)
    tokenizer.chat_template = TEMPLATE
    tokenizer.backend_tokenizer.save(str(root / "tokenizer.json"))
    prefix, suffix = runner.prompt_format(tokenizer)
    runner.install(root / "runner", {"model": "../model.onnx", "tokenizer": "../tokenizer.json", "prefix": prefix,
                                     "suffix": suffix, "stop": [2], "answer_tokens": 12, "threads": 1})
    return root, tokenizer


def _run(argv: list[str]) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_template_is_rendered_around_the_question(installed):
    _, tokenizer = installed
    assert runner.prompt_format(tokenizer) == ("<s>user\n", "</s>\n<s>assistant\n")
    assert runner.prompt_format(tokenizer, system="Be brief.") == ("<s>system\nBe brief.</s>\n<s>user\n",
                                                                  "</s>\n<s>assistant\n")
    tokenizer_without = tiny_tokenizer(VOCAB)
    assert runner.prompt_format(tokenizer_without) == ("", "")


def test_the_installed_runner_answers_as_the_hosts_session(installed):
    root, tokenizer = installed
    config = str(root / "runner" / runner.CONFIG)
    got = _run([sys.executable, "-I", str(root / "runner"), config, "Pump 3 reported", "--tokens"])
    assert got["prompt"] == tokenizer("<s>user\nPump 3 reported</s>\n<s>assistant\n", add_special_tokens=False)[
        "input_ids"]
    assert got["answer"] == session.greedy(root / "model.onnx", got["prompt"], 12, 1, frozenset({2}))
    text = subprocess.run([sys.executable, "-I", str(root / "runner"), config, "Pump 3 reported", "-n", "5"],
                          capture_output=True, text=True, check=True).stdout
    assert text == tokenizer.decode(got["answer"][:5], skip_special_tokens=True) + "\n"
    sampled = _run([sys.executable, "-I", str(root / "runner"), config, "Pump 3", "--temp", "1.5", "--seed", "3",
                    "--tokens"])
    assert sampled == _run([sys.executable, "-I", str(root / "runner"), config, "Pump 3", "--temp", "1.5", "--seed",
                            "3", "--tokens"])


def test_the_runner_on_the_devices_python_under_qemu_answers_the_hosts_best_tokens(installed, tmp_path):
    root, _ = installed
    python = device_python.device_python("aarch64", tmp_path)
    device = get_device("qemu-aarch64")
    run = device.exec(device.tool([*python.argv(), "-I", str(root / "runner"), str(root / "runner" / runner.CONFIG),
                                   "Pump 3 reported", "--tokens"]), "the bundle's runner")
    got = json.loads(run.stdout)
    assert len(got["answer"]) > 0
    # The host reads the device's answer token by token: each is the host's best in that context, to
    # within the rounding of other kernels (NEON, not AVX2).
    (logits,) = session.sequence_logits(root / "model.onnx", np.array([got["prompt"] + got["answer"]]), threads=1)
    for i, token in enumerate(got["answer"]):
        row = logits[len(got["prompt"]) - 1 + i]
        assert row[token] >= row.max() - 1e-3, (i, token, int(row.argmax()))
