"""Bad input: one clear sentence, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.models.embedded import embedded_gguf

# Root reads every file whatever its mode; without these capabilities it obeys the modes like anyone.
WITHOUT_DAC_OVERRIDE = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
                        "--bounding-set=-dac_override,-dac_read_search")


def edgeprune(*args: str, cwd=None, env=None, prefix: tuple[str, ...] = (), timeout: float | None = None
              ) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True,
                          cwd=cwd, env=None if env is None else os.environ | env, timeout=timeout)


def unreadable(path: Path, text: str) -> Path:
    """A file its owner (root, here) cannot read once edgeprune runs WITHOUT_DAC_OVERRIDE."""
    path.write_text(text)
    path.chmod(0)
    return path


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_targets_lists_and_shows():
    listing = edgeprune("targets")
    assert listing.returncode == 0
    assert "arm16g" in listing.stdout and "demo" in listing.stdout and "aarch64" in listing.stdout
    shown = edgeprune("targets", "show", "arm16g")
    assert shown.returncode == 0
    assert "latency_budget_s = 2.0" in shown.stdout


def test_unknown_target(tmp_path):
    assert_clean_error(edgeprune("build", "--target", "nope", "-o", str(tmp_path / "o")), "Unknown target 'nope'")
    assert not (tmp_path / "o").exists()


def test_missing_model_path(tmp_path):
    proc = edgeprune("build", "--target", "demo", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "does not exist")
    assert not (tmp_path / "o").exists()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    proc = edgeprune("build", "--target", "demo", "--model", str(model), "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "no .safetensors weights", "pickled")


def test_non_empty_output_needs_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(edgeprune("build", "--target", "demo", "-o", str(out)), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_budget_override(tmp_path):
    proc = edgeprune("build", "--target", "demo", "--speedup", "0.5", "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "Invalid budget override", "speedup")


def test_an_unknown_strategy(tmp_path):
    proc = edgeprune("build", "--target", "demo", "--strategy", "random", "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "Invalid --strategy: strategy must be one of greedy, pareto, not 'random'.")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("executor, message", [
    ("dask", "Invalid --executor: 'dask' is not an executor: use local, ray"),
    ("ray:head-node", "Invalid --executor: 'head-node' is not a Ray address: give HOST:PORT"),
    ("ray://head:client", "Invalid --executor: 'ray://head:client' is not a Ray address"),
    ("local:somewhere", "Invalid --executor: the local executor takes no address."),
    ("ray:127.0.0.1:1", "Nothing answers at the Ray address 127.0.0.1:1 ([Errno 111] Connection refused): start"),
])
def test_an_executor_that_cannot_be(tmp_path, executor, message):
    proc = edgeprune("build", "--target", "demo", "--executor", executor, "-o", str(tmp_path / "o"))
    assert_clean_error(proc, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("runtime, message", [
    ("tvm", "--runtime names the unknown runtime 'tvm': edgeprune runs models with llama.cpp, onnxruntime."),
])
def test_a_runtime_the_build_cannot_search(tmp_path, runtime, message):
    proc = edgeprune("build", "--target", "demo", "--runtime", runtime, "-o", str(tmp_path / "o"))
    assert_clean_error(proc, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options, message", [
    (("--runtime", "tvm"), "Invalid option: 'runtime': unknown runtime 'tvm'; edgeprune runs models with llama.cpp, "
                           "onnxruntime."),
    (("--runtime", "onnxruntime", "--quant", "Q4_K_M"),
     "Invalid option: 'quant': onnxruntime quantizes as one of F32, INT8, INT4, INT4_B128, not Q4_K_M."),
    (("--quant", "INT4"), "'quant': llama.cpp quantizes as one of F32, F16, BF16, Q8_0"),
    (("--runtime", "onnxruntime", "--recipe", "iq4_nl-narrow"),
     "Invalid option: recipes name llama.cpp's tensor types; onnxruntime takes the default recipe."),
])
def test_prune_options_a_runtime_does_not_take(tmp_path, options, message):
    plan = tmp_path / "plan.json"
    plan.write_text('{"drop_layers": [3]}')
    proc = edgeprune("prune", "--plan", str(plan), *options, "-o", str(tmp_path / "o"))
    assert_clean_error(proc, message)
    assert not (tmp_path / "o").exists()


def test_malformed_target_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('description = "x"\n[hardware]\narch = "aarch64"\n')
    assert_clean_error(edgeprune("build", "--target", str(bad), "-o", str(tmp_path / "o")), str(bad), "missing key")


@pytest.mark.slow
def test_calibration_file_too_short(tmp_path, cache_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("Only a few words here.")
    proc = edgeprune("build", "--target", "demo", "--calib", str(calib), "-o", str(tmp_path / "o"),
                     "--cache-dir", str(cache_dir), "-q")
    assert_clean_error(proc, "calib.txt has", "tokens but the profile needs")
    assert not (tmp_path / "o").exists()


# -- inputs that cannot be read or make no sense (one sentence each, exit 2) -----------------------

DEMO_TARGET = Path(__file__).resolve().parent.parent / "targets" / "demo.toml"


def test_unreadable_target_file(tmp_path):
    target = unreadable(tmp_path / "mine.toml", DEMO_TARGET.read_text())
    proc = edgeprune("build", "--target", str(target), "-o", str(tmp_path / "o"), prefix=WITHOUT_DAC_OVERRIDE)
    assert_clean_error(proc, "Cannot read target file", "mine.toml", "Permission denied")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()


def test_unreadable_plan_file(tmp_path):
    plan = unreadable(tmp_path / "plan.toml", "drop_layers = [3]\n")
    proc = edgeprune("prune", "--plan", str(plan), "-o", str(tmp_path / "o"), prefix=WITHOUT_DAC_OVERRIDE)
    assert_clean_error(proc, "Cannot read plan file", "Permission denied")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("text", ["[3, 5]", '"drop_layers"', "null"])
def test_json_plan_that_is_not_an_object(tmp_path, text):
    plan = tmp_path / "plan.json"
    plan.write_text(text)
    proc = edgeprune("prune", "--plan", str(plan), "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "plan.json is JSON but not an object")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()


def test_targets_show_a_path_without_the_toml_suffix(tmp_path):
    (tmp_path / "mine").write_text(DEMO_TARGET.read_text())
    shown = edgeprune("targets", "show", str(tmp_path / "mine"))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"# mine: {tmp_path / 'mine'}") and "[slo]" in shown.stdout
    assert_clean_error(edgeprune("targets", "show", str(tmp_path / "nope")), "does not exist")


def _sharded_model_dir(directory: Path, index: str) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model-00001-of-00001.safetensors").write_bytes(b"never read")
    (directory / "model.safetensors.index.json").write_text(index)
    return directory


@pytest.mark.parametrize("index", ["{not json", "[]", '{"weight_map": ["model-00001-of-00001.safetensors"]}'])
def test_malformed_weight_index(tmp_path, index):
    model = _sharded_model_dir(tmp_path / "model", index)
    proc = edgeprune("build", "--target", "demo", "--model", str(model), "-o", str(tmp_path / "o"))
    assert_clean_error(proc, "model.safetensors.index.json is not a valid index")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_that_cannot_be_downloaded(tmp_path, offline):
    """Offline (HF_HUB_OFFLINE, or no network: this machine reaches no hub) or missing: one sentence."""
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_ETAG_TIMEOUT": "3",
           "HF_HUB_DOWNLOAD_TIMEOUT": "3"}
    proc = edgeprune("prune", "--plan", str(plan), "--model", "edgeprune-tests/no-such-model", "-o",
                     str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache"), env=env)
    assert_clean_error(proc, "--model edgeprune-tests/no-such-model", "Hugging Face hub")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()


# -- the output directory: checked before any work, replaced only when it is edgeprune's --------------

@pytest.mark.parametrize("name", [".", "..", "/"])
def test_output_that_names_no_directory_of_its_own(tmp_path, name):
    (tmp_path / "work").mkdir()
    proc = edgeprune("build", "--target", "demo", "-o", name, cwd=tmp_path / "work")
    assert_clean_error(proc, f"Output {name}")
    assert proc.returncode == 2 and os.listdir(tmp_path / "work") == []


def test_output_that_holds_the_current_directory(tmp_path):
    (tmp_path / "project" / "src").mkdir(parents=True)
    proc = edgeprune("build", "--target", "demo", "-o", str(tmp_path / "project"), "--force",
                     cwd=tmp_path / "project" / "src")
    assert_clean_error(proc, "is the current directory or holds it")
    assert (tmp_path / "project" / "src").is_dir()


def test_output_that_holds_the_cache_or_the_model(tmp_path):
    cache = tmp_path / "work" / "cache"
    cache.mkdir(parents=True)
    proc = edgeprune("build", "--target", "demo", "-o", str(tmp_path / "work"), "--cache-dir", str(cache), "--force")
    assert_clean_error(proc, "would replace the cache directory")
    model = tmp_path / "models" / "m.gguf"
    model.parent.mkdir()
    shutil.copyfile(embedded_gguf(), model)  # a valid GGUF: a damaged one is refused earlier, for itself
    proc = edgeprune("build", "--target", "demo", "-m", str(model), "-o", str(tmp_path / "models"), "--force")
    assert_clean_error(proc, "would replace the model's directory")
    assert model.stat().st_size == embedded_gguf().stat().st_size


def test_force_refuses_a_directory_edgeprune_did_not_write(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    proc = edgeprune("build", "--target", "demo", "-o", str(project), "--force")
    assert_clean_error(proc, "was not written by edgeprune", "--force replaces only edgeprune's own outputs")
    assert proc.returncode == 2 and (project / "notes.txt").read_text() == "mine"
    # A manifest edgeprune did not write (no edgeprune_version) is no licence either.
    (project / "manifest.json").write_text('{"files": {"notes.txt": "0"}}')
    assert_clean_error(edgeprune("build", "--target", "demo", "-o", str(project), "--force"),
                       "was not written by edgeprune")
    # Nor is edgeprune's manifest when the directory also holds files it does not list.
    (project / "manifest.json").write_text('{"edgeprune_version": "0.1.0", "files": {"notes.txt": "0"}}')
    (project / "thesis.tex").write_text("mine too")
    assert_clean_error(edgeprune("build", "--target", "demo", "-o", str(project), "--force"),
                       "holds files edgeprune did not write (thesis.tex)")
    assert (project / "thesis.tex").read_text() == "mine too"


def test_output_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = edgeprune("build", "--target", "demo", "-o", str(tmp_path / "file" / "out"))
    assert_clean_error(proc, "is not a directory")


def test_unreadable_weights_reach_the_last_resort_handler(tmp_path):
    """An OSError no code names more precisely: one sentence from cli.main, the traceback only with -vv."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    unreadable(model / "model.safetensors", "weights")
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [1]\n")
    args = ("prune", "--plan", str(plan), "--model", str(model), "-o", str(tmp_path / "o"), "--cache-dir",
            str(tmp_path / "cache"))
    proc = edgeprune(*args, prefix=WITHOUT_DAC_OVERRIDE)
    assert_clean_error(proc, f"Permission denied for {model / 'model.safetensors'}", "check its permissions")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
    verbose = edgeprune(*args, "-vv", prefix=WITHOUT_DAC_OVERRIDE)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "PermissionError" in verbose.stderr


def test_force_accepts_edgeprunes_own_output_signed_or_with_a_writers_leftovers(tmp_path):
    import json

    from edgeprune.bundle import check_output_dir
    from edgeprune.errors import EdgepruneError

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "model.gguf").write_bytes(b"GGUF")
    (out / "manifest.json").write_text(json.dumps({"edgeprune_version": "0.1.0", "files": {"model.gguf": "ab" * 32}}))
    (out / "manifest.json.sig").write_text("signature")
    (out / ".edgeprune-tmp-k3j2x1").write_text("{half")  # what a killed verify leaves
    check_output_dir(out, force=True)
    with pytest.raises(EdgepruneError, match="not empty"):
        check_output_dir(out, force=False)
