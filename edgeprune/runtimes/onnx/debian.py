"""Debian's binary packages for another architecture, fetched and unpacked without dpkg or apt.

The chain of trust is Debian's own: the release file (InRelease) over HTTPS, its OpenPGP signature
checked with gpgv against Debian's archive keyring where both are installed, the package index
checked against the SHA-256 the release file lists, and every package against the SHA-256 the
index lists. A `.deb` is an ar archive whose `data.tar.*` member holds the files.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import shutil
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file

MIRROR = "https://deb.debian.org/debian"
RELEASE = "bookworm"  # Debian 12: glibc 2.36, Python 3.11
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_AR_MAGIC = b"!<arch>\n"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str  # in the pool, relative to MIRROR
    sha256: str
    size: int


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()
    except OSError as e:
        raise EdgepruneError(f"Could not fetch {url} ({e}); check the network, or fetch the device packages on a "
                             "machine that can (python -m edgeprune.runtimes.onnx.device_python ARCH DIR) and "
                             "point EDGEPRUNE_DEVICE_PACKAGES at DIR.") from None


def release_file() -> tuple[bytes, bool]:
    """The release's InRelease, and whether its signature was checked (gpgv and Debian's keyring
    installed); a bad signature is refused."""
    data = _get(f"{MIRROR}/dists/{RELEASE}/InRelease")
    gpgv = shutil.which("gpgv")
    if gpgv is None or not KEYRING.is_file():
        return data, False
    run = subprocess.run([gpgv, "--keyring", str(KEYRING), "-"], input=data, capture_output=True)
    if run.returncode != 0:
        why = (run.stderr.decode(errors="replace").strip().splitlines() or ["gpgv failed"])[-1]
        raise EdgepruneError(f"Debian's release file for {RELEASE} does not carry a valid signature from the archive "
                             f"keyring ({why}); not using it.")
    return data, True


def _listed_sha256(release: bytes, path: str) -> str:
    section = release.decode(errors="replace").split("\nSHA256:\n", 1)[-1]
    for line in section.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == path:
            return parts[0]
    raise EdgepruneError(f"Debian's release file for {RELEASE} lists no {path}.")


def package_index(arch: str, release: bytes) -> dict[str, Package]:
    """Every package of `arch` (a Debian name: arm64, amd64) in the release's main component."""
    path = f"main/binary-{arch}/Packages.xz"
    data = _get(f"{MIRROR}/dists/{RELEASE}/{path}")
    if hashlib.sha256(data).hexdigest() != _listed_sha256(release, path):
        raise EdgepruneError(f"Debian's {path} does not match the SHA-256 its release file lists; not using it.")
    return parse_index(lzma.decompress(data).decode())


def parse_index(text: str) -> dict[str, Package]:
    out = {}
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if "Package" in fields and "Filename" in fields:
            out[fields["Package"]] = Package(fields["Package"], fields["Version"], fields["Filename"],
                                             fields["SHA256"], int(fields["Size"]))
    return out


def download(package: Package, directory: Path) -> Path:
    """The package's file in `directory`, fetched unless a file with its SHA-256 is already there."""
    out = directory / Path(package.filename).name
    if out.is_file() and sha256_file(out) == package.sha256:
        return out
    data = _get(f"{MIRROR}/{package.filename}")
    if hashlib.sha256(data).hexdigest() != package.sha256:
        raise EdgepruneError(f"{out.name} from the Debian mirror does not match the SHA-256 its index lists; "
                             "not using it.")
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(data)
    tmp.rename(out)
    return out


def ar_members(path: Path) -> dict[str, bytes]:
    """The members of an ar archive (a .deb's debian-binary, control.tar.*, data.tar.*)."""
    data = path.read_bytes()
    if not data.startswith(_AR_MAGIC):
        raise EdgepruneError(f"{path.name} is not a Debian package (no ar archive header).")
    members, at = {}, len(_AR_MAGIC)
    while at + 60 <= len(data):
        header = data[at:at + 60]
        name = header[:16].decode().strip().rstrip("/")
        try:
            size = int(header[48:58].decode().strip())
        except ValueError:
            raise EdgepruneError(f"{path.name} is not a well-formed Debian package (member header at byte {at}).") \
                from None
        at += 60
        if at + size > len(data):
            raise EdgepruneError(f"{path.name} is truncated: its member {name} runs past the end of the file.")
        members[name] = data[at:at + size]
        at += size + size % 2  # members are aligned to even offsets
    return members


def unpack(deb: Path, root: Path) -> None:
    """The package's files under `root`: regular files, directories and symlinks (an absolute link
    made relative, so it stays inside `root`); nothing is written outside `root`."""
    data = next((v for k, v in ar_members(deb).items() if k.startswith("data.tar")), None)
    if data is None:
        raise EdgepruneError(f"{deb.name} holds no data.tar member: not a binary package.")
    inside = root.resolve()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            relative = Path(_in_archive(member.name))
            if not relative.parts or ".." in relative.parts:
                continue
            target = root / relative
            if not target.parent.resolve().is_relative_to(inside):  # through a link leading out
                raise EdgepruneError(f"{deb.name} would write {member.name} outside the directory it is unpacked in.")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.issym():
                link = member.linkname
                if link.startswith("/"):
                    link = str(Path(*([".."] * (len(relative.parts) - 1))) / link.lstrip("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                target.symlink_to(link)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                with tar.extractfile(member) as src, target.open("wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
                target.chmod(member.mode & 0o755)
            elif member.islnk():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                shutil.copy2(root / _in_archive(member.linkname), target)


def _in_archive(name: str) -> str:
    """A tar member's path relative to the archive's root ("./usr/bin/x" -> "usr/bin/x")."""
    return name.removeprefix("./").lstrip("/")
