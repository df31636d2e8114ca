"""ssh:// devices against a real sshd on 127.0.0.1: same tokens as local, host keys verified,
unreachable devices a clear error within the timeout, everything in a remote command quoted."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from sshd import keygen

from conftest import tiny_llama
from edgeprune.config import DeviceConfig
from edgeprune.devices import get_device
from edgeprune.devices.ssh import SshAddress
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf
from edgeprune.measure import Workload
from edgeprune.quantize import quantize
from edgeprune.runtimes.base import Programs
from edgeprune.runtimes.llamacpp.tools import ToolsRunner
from edgeprune.runtimes.registry import get_runtime


def ssh_config(sshd, **kwargs) -> DeviceConfig:
    return DeviceConfig(url=sshd.url, identity=sshd.identity, known_hosts=sshd.known_hosts, **kwargs)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, embedded_tokenizer_spec) -> Path:
    d = tmp_path_factory.mktemp("ssh-gguf")
    f32 = d / "tiny-f32.gguf"
    export_gguf(tiny_llama(tied=True), embedded_tokenizer_spec, f32, "F32", Provenance("t", "0" * 64, {}), "t")
    quantize(f32, d / "tiny.gguf", "Q8_0", threads=2)
    return d / "tiny.gguf"


WORKLOAD = Workload(prompt=tuple(range(100, 124)), answer_tokens=12, threads=1, warmup=1, repetitions=2)


def test_python_runner_over_ssh_gives_the_same_tokens_as_local(sshd, tiny_gguf):
    with get_device(ssh_config(sshd, python=sys.executable)) as remote:
        assert remote.arch == get_device("local").arch and remote.cores >= 1
        record = get_runtime().runner(remote).benchmark(tiny_gguf, WORKLOAD, baseline=tiny_gguf)
        workdir = remote._workdir
    local = get_runtime().runner(get_device("local")).benchmark(tiny_gguf, WORKLOAD)
    assert len(record.tokens) == WORKLOAD.answer_tokens
    assert record.tokens == local.tokens
    assert record.device == sshd.url and record.runner == "llama-cpp-python" and record.peak_rss_bytes > 1 << 20
    assert len(record.runs) == len(record.baseline_runs) == 2 and 0.3 < record.speedup < 3
    assert record.cpus == [0]  # pinned to as many cores as threads
    assert workdir and not Path(workdir).exists()  # the remote copies are removed at the end


def test_unknown_host_key_is_refused_unless_accepted_on_first_use(sshd, tiny_gguf, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(EdgepruneError, match=rf"host key of \[127.0.0.1\]:{sshd.port} is not in {empty}"):
        _ = get_device(DeviceConfig(url=sshd.url, identity=sshd.identity, known_hosts=empty)).arch
    tofu = get_device(DeviceConfig(url=sshd.url, identity=sshd.identity, known_hosts=empty, accept_new_host_key=True))
    assert tofu.arch
    assert sshd.host_pub in empty.read_text()  # remembered: from now on it is verified


def test_wrong_host_key_is_refused_without_retrying(sshd, tmp_path):
    other = keygen(tmp_path / "other")
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 {other}\n")
    t0 = time.monotonic()
    for accept_new in (False, True):  # accepting new keys never accepts a changed one
        config = DeviceConfig(url=sshd.url, identity=sshd.identity, known_hosts=wrong, accept_new_host_key=accept_new)
        with pytest.raises(EdgepruneError, match=r"differs from the one in .*refusing to connect"):
            _ = get_device(config).arch
    assert time.monotonic() - t0 < 10


def test_wrong_key_is_a_refused_login(sshd, tmp_path):
    keygen(tmp_path / "stranger")
    config = DeviceConfig(url=sshd.url, identity=tmp_path / "stranger", known_hosts=sshd.known_hosts)
    with pytest.raises(EdgepruneError, match="refused the login.*--identity"):
        _ = get_device(config).arch


def test_unreachable_port_is_a_clear_error_after_bounded_retries():
    port = _closed_port()
    config = DeviceConfig(url=f"ssh://nobody@127.0.0.1:{port}", retries=1, connect_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(EdgepruneError, match=rf"Cannot reach ssh://nobody@127.0.0.1:{port} after 2 attempt"):
        _ = get_device(config).arch
    assert time.monotonic() - t0 < 10


def test_silent_server_times_out_within_the_connect_timeout():
    # Accepts TCP connections but never speaks SSH: only the timeout can end the wait.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(2)], daemon=True).start()
    port = server.getsockname()[1]
    config = DeviceConfig(url=f"ssh://nobody@127.0.0.1:{port}", retries=1, connect_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(EdgepruneError, match="Cannot reach .* after 2 attempt.*timed out"):
        _ = get_device(config).arch
    elapsed = time.monotonic() - t0
    server.close()
    assert 3 < elapsed < 15  # two attempts of ~2 s, one back-off of 1 s


def test_remote_commands_quote_every_argument(sshd, tmp_path):
    canary = Path.home() / "edgeprune-canary"  # where an unquoted $(...) would create it: the login directory
    canary.unlink(missing_ok=True)
    name = tmp_path / "a b'$(touch edgeprune-canary);`touch edgeprune-canary` \"c\".txt"
    name.write_text("payload with 'quotes' and $HOME\n")
    with get_device(ssh_config(sshd)) as remote:
        staged = remote.stage(name)
        out = remote.exec(["cat", staged], "reading back").stdout.decode()
        echoed = remote.exec(["printf", "%s", "$HOME; rm -rf /nonexistent"], "echo").stdout.decode()
    assert out == name.read_text()
    assert echoed == "$HOME; rm -rf /nonexistent"
    assert not canary.exists()


@pytest.mark.parametrize("url", ["ssh://", "ssh://host:notaport", "ssh://host/path", "ssh://u:pw@host"])
def test_malformed_ssh_urls_are_refused(url):
    with pytest.raises(EdgepruneError, match="not of the form ssh://"):
        SshAddress.parse(url)


@pytest.mark.slow
def test_device_binaries_over_ssh_answer_like_local(sshd, tiny_gguf, cache_dir):
    from edgeprune.config import load_target
    from edgeprune.devices.base import host_arch
    from edgeprune.toolchain import ensure_binaries, spec_for

    tools = Programs(ensure_binaries(spec_for(load_target("demo")), cache_dir).bin, host_arch())  # demo is native
    local = ToolsRunner(get_device("local"), tools)
    with get_device(ssh_config(sshd)) as remote:
        runner = get_runtime().runner(remote, tools)  # no Python there: its own llama.cpp binaries
        assert isinstance(runner, ToolsRunner)
        answer = runner.greedy_completion(tiny_gguf, "Hello", 8, 1).text
        assert answer == local.greedy_completion(tiny_gguf, "Hello", 8, 1).text
        record = runner.benchmark(tiny_gguf, WORKLOAD, baseline=tiny_gguf)
    assert record.runner == "llama-bench" and len(record.runs) == len(record.baseline_runs) == 2
    assert record.peak_rss_bytes > 1 << 20 and record.cpu
    shapes = {(r["n_prompt"], r["n_gen"]) for r in record.raw}
    assert shapes == {(24, 0), (0, 12), (24, 12)}  # llama-bench's own records: prefill, decode, both
    s = record.summary
    assert 0 < s["ttft_p50_s"] < s["latency_p50_s"] and s["decode_tok_s_p50"] > 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
