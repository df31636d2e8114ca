"""The ONNX Runtime bundle's program (runtimes/onnx/runner.py), installed into a directory as a bundle
carries it: on the host's Python it answers what session.greedy answers; on the device's own Python
under qemu-aarch64 each answer token is the host's best within rounding."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

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
    runner.install(root / "runner", {"model": "../model.onnx", "tokenizer": "../tokenizer.json",
                                     "chat": runner.chat_format(tokenizer), "stop": [2], "answer_tokens": 12,
                                     "threads": 1})
    return root, tokenizer


def _run(argv: list[str]) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_template_is_rendered_around_the_question(installed):
    _, tokenizer = installed
    fmt = runner.chat_format(tokenizer)
    assert fmt == {"user": ["<s>user\n", "</s>\n<s>assistant\n"],
                   "system_user": ["<s>system\n", "</s>\n<s>user\n", "</s>\n<s>assistant\n"]}
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi?"}]
        assert runner.render(fmt, "Hi?", system) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                                   add_generation_prompt=True)
    assert runner.chat_format(tiny_tokenizer(VOCAB))["user"] == ["", ""]
    tokenizer_twice = tiny_tokenizer(VOCAB)
    tokenizer_twice.chat_template = "{{ messages[0]['content'] }}{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="does not place the user message once"):
        runner.chat_format(tokenizer_twice)


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


def test_the_server_answers_single_turn_chats_as_run_does(installed):
    root, _ = installed
    config = str(root / "runner" / runner.CONFIG)
    expected = _run([sys.executable, "-I", str(root / "runner"), config, "Pump 3 reported", "--system", "Be brief.",
                     "--tokens"])
    server = subprocess.Popen([sys.executable, "-I", str(root / "runner"), config, "--serve", "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]

        def post(body: dict) -> tuple[int, dict]:
            request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, body = post({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Pump 3 reported"}], "max_tokens": 12})
        assert status == 200 and body["usage"] == {"prompt_tokens": len(expected["prompt"]),
                                                   "completion_tokens": len(expected["answer"]),
                                                   "total_tokens": len(expected["prompt"]) + len(expected["answer"])}
        (choice,) = body["choices"]
        assert choice["message"]["content"] == installed[1].decode(expected["answer"], skip_special_tokens=True)
        assert choice["finish_reason"] == ("length" if len(expected["answer"]) == 12 else "stop")
        status, body = post({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                          {"role": "user", "content": "c"}]})
        assert status == 400 and "single-turn" in body["error"]["message"]
        status, body = post({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000})
        assert status == 400 and "exceed the 2048-token context" in body["error"]["message"]
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            assert json.loads(response.read()) == {"status": "ok"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_verify_reads_a_devices_answer_with_the_hosts_logits(installed):
    from edgeprune.runtimes.onnx.answers import MAX_LOGIT_GAP, read_answer

    root, _ = installed
    model, prompt = root / "model.onnx", [5, 17, 33, 101, 7]
    greedy = session.greedy(model, prompt, 6, 1)
    assert len(greedy) == 6
    same = read_answer(model, prompt, greedy, {2}, 6, 1)
    assert same.passed and same.positions == same.top1 == 6 and same.max_gap <= 1e-6
    (logits,) = session.sequence_logits(model, np.array([prompt + greedy]), threads=1)
    worst = int(logits[len(prompt) + 2].argmin())  # the host's last choice for the answer's token 3
    wrong = read_answer(model, prompt, [*greedy[:3], worst, *greedy[4:]], {2}, 6, 1)
    assert not wrong.passed and wrong.failure.startswith("at token 3 the device continues with") and \
        wrong.max_gap > MAX_LOGIT_GAP and wrong.positions == 4
    # An answer cut short must end where the host would stop: here no stop token is the host's best.
    short = read_answer(model, prompt, greedy[:2], {int(logits[len(prompt) + 1].argmin())}, 6, 1)
    assert not short.passed and "its end of answer" in short.failure
    assert "more than the 6 asked for" in read_answer(model, prompt, greedy + [1], {2}, 6, 1).failure
