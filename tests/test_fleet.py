"""A fleet of devices: two real sshd servers on 127.0.0.1 timing in parallel; one stopped mid-run
is dropped and its work re-done by the other; a build on the pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from sshd import free_port, start_sshd
from test_ssh import tiny_gguf  # noqa: F401  (a module-scoped fixture: a tiny Q8_0 GGUF)

from conftest import REPO
from edgeprune.config import DeviceConfig
from edgeprune.devices import DeviceError, DeviceUnreachable, get_device
from edgeprune.fleet import Fleet
from edgeprune.measure import Workload
from edgeprune.runtimes.registry import get_runtime

WORKLOAD = Workload(prompt=tuple(range(100, 116)), answer_tokens=4, threads=1, warmup=0, repetitions=1)


@pytest.fixture
def pair(tmp_path):
    """Two sshd servers one key reaches (one known_hosts lists both)."""
    first = start_sshd(tmp_path / "a")
    second = start_sshd(tmp_path / "b", keys_of=first)
    yield first, second
    for server in (first, second):
        server.proc.terminate()
        server.proc.wait(10)


def config(server, **options) -> DeviceConfig:
    return DeviceConfig(url=server.url, identity=server.identity, known_hosts=server.known_hosts, **options)


def test_urls_make_a_fleet_whose_first_device_is_the_url():
    fleet = DeviceConfig(urls=("ssh://a@h:1", "ssh://b@h:2"), identity="/k")
    assert fleet.url == "ssh://a@h:1" and fleet.fleet == ("ssh://a@h:1", "ssh://b@h:2")
    assert [m.url for m in fleet.members()] == list(fleet.fleet) and all(m.urls == () for m in fleet.members())
    assert str(fleet.members()[1].identity) == "/k"
    assert DeviceConfig(url="local").members() == [DeviceConfig(url="local")]
    for bad, says in [({"urls": ("qemu-aarch64",)}, "local or ssh://"), ({"url": "local", "urls": ("ssh://x",)},
                      "either url"), ({"urls": ("local", "local")}, "listed twice"),
                      ({"urls": ("local", "ssh://x"), "ram_cap": True}, "ram_cap")]:
        with pytest.raises(ValueError, match=says):
            DeviceConfig(**bad)


def test_a_fleet_times_in_parallel_and_drops_a_device_that_stops_answering(pair, tiny_gguf):  # noqa: F811
    a, b = pair
    runtime = get_runtime()
    with get_device(config(a, python=sys.executable)) as da, get_device(config(b, python=sys.executable,
                                                                                 retries=0)) as db:
        fleet = Fleet([{"llama.cpp": runtime.runner(da)}, {"llama.cpp": runtime.runner(db)}])
        spans: dict[str, list[tuple[float, float]]] = {a.url: [], b.url: []}
        lock = threading.Lock()

        def time_one(timers, path):
            device = timers["llama.cpp"].device
            t0 = time.monotonic()
            record = timers["llama.cpp"].benchmark(path, WORKLOAD)
            with lock:
                spans[device.url].append((t0, time.monotonic()))
                if device.url == b.url:  # b's sshd goes away after its first run
                    b.proc.terminate()
                    b.proc.wait(10)
            return record

        records = fleet.map(time_one, [tiny_gguf] * 4)
    assert len(records) == 4 and all(r.runs for r in records)
    assert [r.device for r in records].count(b.url) == 1 and len(spans[a.url]) == 3
    assert list(fleet.dropped) == [b.url] and "Cannot reach" in fleet.dropped[b.url]
    assert fleet.size == 1 and fleet.primary["llama.cpp"].device.url == a.url
    # Side by side: b's run started before a's first one ended.
    (b_start, _), (_, a_end) = spans[b.url][0], spans[a.url][0]
    assert b_start < a_end


def test_a_program_failing_on_a_device_is_an_error_not_a_dropped_device(pair):
    a, b = pair
    with get_device(config(a)) as da, get_device(config(b)) as db:
        fleet = Fleet([{"llama.cpp": _Probe(da)}, {"llama.cpp": _Probe(db)}])

        def fails(timers, _):
            timers["llama.cpp"].device.exec(["sh", "-c", "exit 3"], "a failing program")

        with pytest.raises(DeviceError, match="a failing program failed") as e:
            fleet.map(fails, [1, 2])
        assert not isinstance(e.value, DeviceUnreachable) and fleet.dropped == {}


def test_one_device_that_stops_answering_fails_the_run_naming_it(tmp_path):
    closed = f"ssh://nobody@127.0.0.1:{free_port()}"
    with get_device(DeviceConfig(url=closed, retries=0, connect_timeout_s=2)) as device:
        fleet = Fleet([{"llama.cpp": _Probe(device)}])
        with pytest.raises(DeviceUnreachable, match=f"Cannot reach {closed}"):
            fleet.map(lambda timers, _: timers["llama.cpp"].device.exec(["true"], "a probe"), [1])


class _Probe:
    """What a fleet needs of a runner to run a remote command: its device."""

    def __init__(self, device):
        self.device = device


@pytest.mark.slow
def test_build_on_a_fleet_of_two_ssh_devices(pair, tmp_path, cache_dir):
    a, b = pair
    # One thread per run: the two "devices" share this machine's cores, and llama.cpp's spinning
    # threads slow each other down badly when there are more of them than cores.
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "pair.toml").write_text(
        (REPO / "targets" / "demo.toml").read_text().replace("cores = 2", "cores = 1")
        .replace("prompt_tokens = 64", "prompt_tokens = 32").replace("answer_tokens = 100", "answer_tokens = 32")
        .replace("speedup = 1.3", "speedup = 1.1"))
    profile = tmp_path / "fleet.toml"
    quick = (REPO / "profiles" / "quick.toml").read_text()
    profile.write_text(quick.replace("max_candidates = 10", "max_candidates = 4")
                       .replace("repetitions = 3", "repetitions = 3\ntune_settings = false"))
    gone = f"ssh://{a.user}@127.0.0.1:{free_port()}"  # nothing listens there: left out, the build goes on
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeprune", "build", "--target", "pair", "--profile", str(profile), "-o", str(out),
         "--cache-dir", str(cache_dir), "-q", "--device", a.url, "--device", b.url, "--device", gone,
         "--identity", str(a.identity), "--known-hosts", str(b.known_hosts)],
        capture_output=True, text=True, env=os.environ | {"EDGEPRUNE_TARGETS": str(targets)})
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr  # 1: no candidate met 1.1x
    assert f"{gone} left out of the fleet" in proc.stderr  # a warning, shown even with -q
    report = json.loads((out / "report.json").read_text())
    assert report["device"]["fleet"]["urls"] == [a.url, b.url, gone]
    assert list(report["device"]["fleet"]["dropped"]) == [gone]
    timed = [c for c in report["search"]["candidates"] if c["measured"]]
    assert {c["device"] for c in timed} == {a.url, b.url}, "both devices timed candidates"
    assert all(c["benchmark"]["baseline_runs"] for c in timed[1:]), "each alongside the baseline on its device"
    assert "Timed on a fleet of 3 devices" in (out / "report.md").read_text()


def test_only_build_takes_several_devices(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "bench", str(tmp_path / "m.gguf"), "--target", "demo",
                           "--device", "local", "--device", "ssh://x@127.0.0.1:1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--device is given 2 times" in proc.stderr and "Traceback" not in proc.stderr
