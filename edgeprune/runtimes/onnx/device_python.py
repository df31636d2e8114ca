"""The Python an ONNX Runtime bundle runs on its device, assembled on this machine.

CPython 3.11 and the C libraries under it (glibc and its dynamic loader included) from Debian 12's
packages for the target's architecture, and onnxruntime, numpy and tokenizers from their manylinux
wheels at the versions installed here (the device runs what the host measured), unpacked into one
directory. It is started through its own loader (`argv`), so it needs nothing on the device: no
Python, no pip, no particular distribution or glibc.

The package files are looked for in $EDGEPRUNE_DEVICE_PACKAGES (only there, when it is set), else a
checkout's .deps/device-packages (`make install` fetches them there), then the cache; if neither
holds them they are fetched into the cache (Debian's pool, verified as `debian.py` says; the wheels with pip).
Assembled once per set of package files, atomically, under `<cache>/device-python/`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file, sha256_json
from edgeprune.runtimes.onnx import debian

log = logging.getLogger(__name__)

ENV = "EDGEPRUNE_DEVICE_PACKAGES"
PYTHON = "3.11"  # Debian 12's, and the wheels' ABI (cp311)
DEBIAN_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",  # the interpreter and its stdlib
    "libc6", "libgcc-s1", "libstdc++6",  # glibc and its loader; onnxruntime is C++
    "zlib1g", "libexpat1", "libffi8", "libbz2-1.0", "liblzma5", "libuuid1", "libcrypt1",  # stdlib modules
)
WHEELS = ("onnxruntime", "numpy", "tokenizers")
SOURCES = "sources.json"
MADE = "device-python.json"
# Bump when the assembly below changes what a root holds: roots are keyed by inputs and this.
ASSEMBLY = 2
# Not needed to run a model: documentation, and numpy's own test suite.
_TRIM = ("usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/gdb", "usr/share/binfmts",
         "usr/share/applications", "usr/share/pixmaps", "usr/lib/python3/dist-packages/numpy/_core/tests")
SITE = "usr/lib/python3/dist-packages"  # on Debian's sys.path, relative to the interpreter's prefix


@dataclass(frozen=True)
class Arch:
    debian: str  # Debian's architecture name
    wheel: str  # the manylinux platform tags' machine
    triplet: str  # the multiarch library directory

    @property
    def loader(self) -> str:
        return {"arm64": "lib/ld-linux-aarch64.so.1", "amd64": "lib64/ld-linux-x86-64.so.2"}[self.debian]

    @property
    def library_dirs(self) -> tuple[str, str]:
        return f"lib/{self.triplet}", f"usr/lib/{self.triplet}"


ARCHES = {"aarch64": Arch("arm64", "aarch64", "aarch64-linux-gnu"),
          "x86_64": Arch("amd64", "x86_64", "x86_64-linux-gnu")}


@dataclass(frozen=True)
class DevicePython:
    arch: str
    root: Path
    versions: dict[str, str]  # python, and each wheel's

    def argv(self, root: str | Path | None = None) -> list[str]:
        """The command that starts this Python with the root at `root` (default: where it is here)."""
        return command(self.arch, str(root or self.root))


INTERPRETER = f"usr/bin/python{PYTHON}"


def command(arch: str, root: str) -> list[str]:
    """The command that starts the device Python for `arch` whose root is at `root` (a path, or a
    shell expression such as "$py" for a script): through its own loader, with its own libraries."""
    a = ARCHES[arch]
    libs = ":".join(f"{root}/{d}" for d in a.library_dirs)
    return [f"{root}/{a.loader}", "--library-path", libs, f"{root}/{INTERPRETER}"]


def _arch(arch: str) -> Arch:
    if arch not in ARCHES:
        raise EdgepruneError(f"edgeprune assembles the ONNX Runtime bundle's Python for {', '.join(ARCHES)}, "
                             f"not {arch}.")
    return ARCHES[arch]


def check(arch: str) -> None:
    """Refuse, before any work, an architecture edgeprune cannot assemble a Python for, or a host
    without the libraries whose versions the device must run."""
    _arch(arch)
    for name in WHEELS:
        _host_version(name)


def _checkout_dir() -> Path:
    return Path(__file__).resolve().parents[3] / ".deps" / "device-packages"


def fetch(arch: str, directory: Path) -> Path:
    """Download the package files for `arch` into `directory/<arch>` (reusing files already there
    whose SHA-256 matches) and record them in its sources.json, last."""
    a = _arch(arch)
    out = directory / arch
    (out / "debs").mkdir(parents=True, exist_ok=True)
    release, signed = debian.release_file()
    index = debian.package_index(a.debian, release)
    missing = [n for n in DEBIAN_PACKAGES if n not in index]
    if missing:
        raise EdgepruneError(f"Debian {debian.RELEASE} has no {a.debian} package {missing[0]}.")
    debs = {}
    for name in DEBIAN_PACKAGES:
        log.info("fetching %s %s (%s)", name, index[name].version, a.debian)
        path = debian.download(index[name], out / "debs")
        debs[name] = {"version": index[name].version, "file": f"debs/{path.name}", "sha256": index[name].sha256}
    wheels = {}
    for name in WHEELS:
        version = _host_version(name)
        wheel_dir = out / "wheels" / name
        shutil.rmtree(wheel_dir, ignore_errors=True)
        platforms = [f"manylinux2014_{a.wheel}"] + [f"manylinux_2_{m}_{a.wheel}" for m in range(17, 37)]
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                              "--python-version", PYTHON, "--implementation", "cp",
                              *(f"--platform={p}" for p in platforms), f"{name}=={version}", "-d", str(wheel_dir)],
                             capture_output=True, text=True)
        found = sorted(wheel_dir.glob("*.whl"))
        if run.returncode != 0 or len(found) != 1:
            raise EdgepruneError(f"pip could not fetch a {a.wheel} wheel of {name} {version} for Python {PYTHON} "
                                 f"({run.stderr.strip().splitlines()[-1:] or 'no wheel'}).")
        wheels[name] = {"version": version, "file": str(found[0].relative_to(out)),
                        "sha256": sha256_file(found[0])}
    sources = {"arch": arch, "debian": {"release": debian.RELEASE, "mirror": debian.MIRROR,
                                        "release_signature_checked": signed, "packages": debs},
               "wheels": wheels}
    tmp = out / (SOURCES + ".part")
    tmp.write_text(json.dumps(sources, indent=2) + "\n")
    tmp.rename(out / SOURCES)
    return out


def _host_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise EdgepruneError(f"{name} is not installed here, so edgeprune cannot tell which version the device "
                             f"should run: pip install {name}.") from None


def packages(arch: str, cache_dir: Path) -> tuple[Path, dict]:
    """The directory holding `arch`'s package files and their sources.json, fetched if none does;
    every file is checked against the SHA-256 recorded for it."""
    _arch(arch)
    given = os.environ.get(ENV)
    roots = [Path(given)] if given else [_checkout_dir(), cache_dir / "device-packages"]
    found = next((r / arch for r in roots if (r / arch / SOURCES).is_file()), None)
    if found is None:
        if given:
            raise EdgepruneError(f"{ENV} is set to {given}, which holds no {arch}/{SOURCES}: fetch the packages "
                                 f"into it (python -m {__name__} {arch} {given}) or unset it.")
        log.info("fetching the device's Python packages for %s into %s", arch, cache_dir / "device-packages")
        found = fetch(arch, cache_dir / "device-packages")
    sources = json.loads((found / SOURCES).read_text())
    for entry in [*sources["debian"]["packages"].values(), *sources["wheels"].values()]:
        path = found / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise EdgepruneError(f"{path} is missing or changed since it was fetched; fetch the device packages again "
                                 f"(python -m {__name__} {arch} {found.parent}).")
    for name in WHEELS:
        if sources["wheels"][name]["version"] != _host_version(name):
            raise EdgepruneError(f"The device packages in {found} hold {name} {sources['wheels'][name]['version']}, "
                                 f"but {_host_version(name)} is installed here; fetch them again "
                                 f"(python -m {__name__} {arch} {found.parent}).")
    return found, sources


def device_python(arch: str, cache_dir: Path) -> DevicePython:
    """The assembled Python for `arch`, made once per set of package files."""
    found, sources = packages(arch, cache_dir)
    key = sha256_json([ASSEMBLY, sources])[:16]
    root = cache_dir / "device-python" / f"{arch}-{key}"
    versions = {"python": sources["debian"]["packages"]["python3.11-minimal"]["version"],
                **{name: w["version"] for name, w in sources["wheels"].items()}}
    if not (root / MADE).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)  # an unfinished one
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as tmp:
            _assemble(found, sources, Path(tmp) / "root", versions)
            (Path(tmp) / "root").rename(root)
    return DevicePython(arch, root, versions)


def _assemble(found: Path, sources: dict, root: Path, versions: dict[str, str]) -> None:
    log.info("assembling the device's Python (%s) in %s", sources["arch"], root)
    root.mkdir()
    for entry in sources["debian"]["packages"].values():
        debian.unpack(found / entry["file"], root)
    site = root / SITE
    site.mkdir(parents=True, exist_ok=True)
    for entry in sources["wheels"].values():
        with zipfile.ZipFile(found / entry["file"]) as wheel:
            for info in wheel.infolist():
                if ".." in Path(info.filename).parts or info.filename.startswith("/"):
                    raise EdgepruneError(f"{entry['file']} holds a path outside its directory: {info.filename}.")
            wheel.extractall(site)
            for info in wheel.infolist():  # zipfile drops the mode bits; shared libraries need x
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    (site / info.filename).chmod(mode)
    for path in _TRIM:
        shutil.rmtree(root / path, ignore_errors=True)
    _resolve_links(root)
    loader = root / ARCHES[sources["arch"]].loader
    if not loader.exists():
        raise EdgepruneError(f"The unpacked libc6 has no dynamic loader at {loader.relative_to(root)}.")
    (root / MADE).write_text(json.dumps({"arch": sources["arch"], "versions": versions, "sources": sources},
                                        indent=2) + "\n")


def _resolve_links(root: Path) -> None:
    """Replace each link by a copy of what it leads to, and drop a link that leads nowhere (in a
    package, to a file of another package): a bundle holds only regular files, so `verify` can
    refuse any link as tampering."""
    for link in sorted(p for p in root.rglob("*") if p.is_symlink()):
        target = link.resolve()
        link.unlink()
        if target.is_file() and target.is_relative_to(root.resolve()):
            shutil.copy2(target, link)
    left = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_symlink()]
    if left:
        raise EdgepruneError(f"The device's Python still holds links after resolving them: {', '.join(left[:3])}.")


def main(argv: list[str]) -> int:
    """`python -m edgeprune.runtimes.onnx.device_python ARCH DIR`: fetch ARCH's package files into DIR."""
    if len(argv) != 2:
        print(f"usage: python -m {__name__} ARCH DIR  (ARCH: {', '.join(ARCHES)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fetch(argv[0], Path(argv[1]))
    except EdgepruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
