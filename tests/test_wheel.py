"""A wheel is a complete install: no checkout, no `make install`, and bundles still find llama.cpp."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO
from edgeprune.hashing import sha256_file
from edgeprune.toolchain.source import installed_version


def _run(*cmd: str, env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
    return proc


@pytest.mark.slow
def test_an_installed_wheel_lists_targets_and_fetches_the_llama_cpp_source(tmp_path):
    # No PYTHONPATH (it would put the checkout first); pip reads the sdist from the repository's .deps
    # (the build backend pip needs to read its metadata comes from the configured index).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "EDGEPRUNE"))}
    env["PIP_FIND_LINKS"] = str(REPO / ".deps")
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(REPO), "-w", str(tmp_path / "dist"),
         env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("edgeprune-*.whl"))

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), env=env, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     env=env, cwd=tmp_path).stdout.strip())
    # The big dependencies from this environment; a plain path line, so its own .pth files (the
    # editable install of the checkout among them) are not processed.
    (site / "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel),
         env=env, cwd=tmp_path)
    where = _run(str(python), "-c", "import edgeprune; print(edgeprune.__file__)", env=env, cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(venv), where

    edgeprune = str(venv / "bin" / "edgeprune")
    listing = _run(edgeprune, "targets", env=env, cwd=tmp_path).stdout
    assert "demo" in listing and "arm16g" in listing
    toolchain_file = _run(str(python), "-c", "from edgeprune.toolchain import spec_for; from edgeprune.config import "
                          "load_target; print(spec_for(load_target('arm16g')).toolchain_file)", env=env,
                          cwd=tmp_path).stdout.strip()
    assert Path(toolchain_file).is_relative_to(venv) and Path(toolchain_file).is_file()

    cache = tmp_path / "cache"
    status = _run(edgeprune, "toolchain", "--cache-dir", str(cache), env=env, cwd=tmp_path).stdout
    assert "llama.cpp source:  not found" in status and "arm16g" in status

    fetched = _run(edgeprune, "toolchain", "source", "--cache-dir", str(cache), env=env, cwd=tmp_path, timeout=900)
    src = cache / "llama.cpp-src" / installed_version()
    assert fetched.stdout.strip() == str(src)
    assert "fetching the llama-cpp-python" in fetched.stderr and "unpacked into" in fetched.stderr
    assert [p.name for p in (cache / "llama.cpp-src").iterdir()] == [installed_version()]  # no temporary left
    for rel in ("CMakeLists.txt", "src/llama.cpp", "ggml/src/ggml.c", "tools/server/server.cpp",
                "convert_hf_to_gguf.py"):
        assert sha256_file(src / rel) == sha256_file(REPO / ".deps" / "llama.cpp" / rel), rel

    again = _run(edgeprune, "toolchain", "source", "--cache-dir", str(cache), env=env, cwd=tmp_path)
    assert again.stdout.strip() == str(src) and "fetching" not in again.stderr  # found in the cache
    status = _run(edgeprune, "toolchain", "--cache-dir", str(cache), env=env, cwd=tmp_path).stdout
    from edgeprune.toolchain.source import llama_source

    assert f"llama.cpp source:  {src.resolve()}" in status
    assert llama_source(cache).digest[:12] in status  # the same build inputs as the checkout's .deps
