"""`edgeprune verify --device ssh://`: a native bundle verified on a real sshd on 127.0.0.1, its SLO
workload timed there with the bundle's own llama-bench, PASS/FAIL, figures written back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cli import edgeprune

from edgeprune.bundle import manifest_hashes
from edgeprune.hashing import sha256_file

pytestmark = pytest.mark.slow


def device_flags(sshd) -> list[str]:
    return ["--device", sshd.url, "--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts)]


@pytest.fixture(scope="module")
def native_bundle(tmp_path_factory, cache_dir, sshd) -> Path:
    """A bundle whose candidates were timed over ssh:// by the target's own llama-bench."""
    out = tmp_path_factory.mktemp("native") / "bundle"
    # A budget the unpruned model meets: the device loop, not the search, is under test.
    proc = edgeprune("build", "--target", "demo", "--profile", "quick", "--latency-budget", "3600", "-o", str(out),
                     "--cache-dir", str(cache_dir), "-q", *device_flags(sshd))
    assert proc.returncode == 0, proc.stderr
    return out


def test_build_measures_candidates_on_the_ssh_device(native_bundle, sshd):
    report = json.loads((native_bundle / "report.json").read_text())
    assert report["device"]["url"] == sshd.url and report["device"]["runner"] == "llama-bench"
    assert report["device"]["is_target_arch"] and report["verified_on_target"]
    bench = report["search"]["candidates"][0]["benchmark"]
    assert bench["runner"] == "llama-bench" and bench["peak_rss_bytes"] > 1 << 20 and bench["raw"]


def verify(bundle: Path, sshd, *extra: str) -> subprocess.CompletedProcess:
    return edgeprune("verify", str(bundle), *device_flags(sshd), "-r", "2", *extra)


def test_verify_over_ssh_passes_and_writes_the_figures_back(native_bundle, sshd, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(native_bundle, bundle)
    proc = verify(bundle, sshd, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] and result["device"] == sshd.url
    slo = result["slo"]
    assert slo["verdict"] == "meets" and slo["device"] == sshd.url and slo["budget"]["latency_s"] == 3600
    assert slo["summary"]["repetitions"] == 2 and slo["peak_rss_bytes"] > 1 << 20
    assert {(r["n_prompt"], r["n_gen"]) for r in slo["benchmark"]["raw"]} == {(64, 0), (0, 100), (64, 100)}
    report = json.loads((bundle / "report.json").read_text())
    assert report["verifications"][-1]["summary"] == slo["summary"]
    assert "## Verified on the device" in (bundle / "report.md").read_text()
    assert "Not yet verified" not in (bundle / "report.html").read_text()  # re-rendered with the figures
    # The rewritten report is in the manifest: the bundle is still intact.
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, digest in manifest_hashes(manifest).items():
        assert sha256_file(bundle / name) == digest, name
    assert edgeprune("verify", str(bundle), "--device", "local", "-r", "1", "-q").returncode == 0


def test_verify_over_ssh_fails_a_missed_budget_with_the_figures(native_bundle, sshd, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(native_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"]["slo"]["latency_budget_s"] = 0.001  # no device answers 100 tokens in a millisecond
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = verify(bundle, sshd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "misses its budget there: over latency budget" in proc.stderr
    report = json.loads((bundle / "report.json").read_text())
    assert report["verifications"][-1]["verdict"] == "over latency budget"
