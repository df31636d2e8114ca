"""Signing a bundle's manifest with an OpenSSH key (`ssh-keygen -Y sign/verify`).

Checksums catch corruption; only a signature from a key the user trusts catches tampering. The
manifest lists the sha256 of every file, so signing it covers the whole bundle.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeprune.atomic import write_atomic
from edgeprune.errors import EdgepruneError, VerificationFailed

log = logging.getLogger(__name__)

NAMESPACE = "edgeprune-bundle"
PRINCIPAL = "edgeprune"  # the signer's name in the allowed_signers file built from a bare public key
SIGNATURE_SUFFIX = ".sig"
_PUBLIC_KEY_TYPES = ("ssh-", "ecdsa-", "sk-")


class SignatureInvalid(VerificationFailed):
    """The manifest's signature is missing, does not verify, or is not from a trusted key."""


def _ssh_keygen(args: list[str], what: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise EdgepruneError(f"ssh-keygen is not installed, and {what} needs it: install the Debian package "
                             "openssh-client.")
    # A new session has no terminal, and SSH_ASKPASS_REQUIRE=never no askpass: a passphrase prompt
    # fails at once instead of waiting for input nobody gives.
    env = os.environ | {"SSH_ASKPASS_REQUIRE": "never"}
    return subprocess.run([exe, *args], input=stdin, capture_output=True, env=env, start_new_session=True,
                          timeout=60)


def _reason(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip() and "@@@" not in ln]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def check_signing_key(key: Path) -> None:
    """Fail now, in one sentence, if `key` cannot sign without a prompt."""
    if not key.is_file():
        raise EdgepruneError(f"Signing key {key} is not a file; give an OpenSSH private key (ssh-keygen -t ed25519).")
    proc = _ssh_keygen(["-y", "-P", "", "-f", str(key)], "--sign")
    if proc.returncode != 0:
        raise EdgepruneError(f"Signing key {key} cannot be used without a prompt ({_reason(proc)}); give an "
                             "unencrypted OpenSSH private key readable only by you (chmod 600).")


def sign_file(path: Path, key: Path) -> Path:
    """Write `path`.sig, signed with `key`; written aside and renamed, so never half-written."""
    check_signing_key(key)
    proc = _ssh_keygen(["-Y", "sign", "-f", str(key), "-n", NAMESPACE], "--sign", stdin=path.read_bytes())
    if proc.returncode != 0 or not proc.stdout:
        raise EdgepruneError(f"ssh-keygen could not sign {path.name} with {key} ({_reason(proc)}).")
    sig = path.with_name(path.name + SIGNATURE_SUFFIX)
    write_atomic(sig, proc.stdout)
    return sig


def _allowed_signers(trusted: Path, directory: Path) -> Path:
    """`trusted` as an allowed_signers file: itself if it is one, else built from its public key(s)."""
    try:
        lines = [ln.strip() for ln in trusted.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise EdgepruneError(f"Trusted key {trusted} cannot be read ({e}); give an OpenSSH public key file "
                             "or an allowed_signers file.") from None
    if not lines:
        raise EdgepruneError(f"Trusted key {trusted} is empty; give an OpenSSH public key file or an allowed_signers "
                             "file.")
    if not all(ln.startswith(_PUBLIC_KEY_TYPES) for ln in lines):
        return trusted
    path = directory / "allowed_signers"
    path.write_text("".join(f'{PRINCIPAL} namespaces="{NAMESPACE}" {" ".join(ln.split()[:2])}\n' for ln in lines))
    return path


def verify_file(path: Path, trusted: Path) -> str:
    """Check `path`.sig against `trusted` (public key or allowed_signers); the signer's principal."""
    sig = path.with_name(path.name + SIGNATURE_SUFFIX)
    if not sig.is_file() or sig.is_symlink():
        raise SignatureInvalid(f"{path.name} is not signed ({sig.name} is missing) and --trusted-key requires a "
                               "signature; sign the bundle with `edgeprune build --sign KEY`.")
    data = path.read_bytes()
    with tempfile.TemporaryDirectory(prefix="edgeprune-verify-") as tmp:
        allowed = _allowed_signers(trusted, Path(tmp))
        found = _ssh_keygen(["-Y", "find-principals", "-f", str(allowed), "-s", str(sig)], "--trusted-key")
        principals = found.stdout.decode(errors="replace").split()
        if found.returncode != 0 or not principals:
            if b"parse signature" in found.stderr:
                raise SignatureInvalid(f"{sig.name} is not a valid SSH signature; the bundle was damaged or tampered "
                                       "with.")
            raise SignatureInvalid(f"{path.name} is signed by a key that {trusted} does not trust; the bundle comes "
                                   "from someone else or was re-signed.")
        proc = _ssh_keygen(["-Y", "verify", "-f", str(allowed), "-I", principals[0], "-n", NAMESPACE, "-s", str(sig)],
                           "--trusted-key", stdin=data)
    if proc.returncode != 0:
        raise SignatureInvalid(f"{sig.name} does not match {path.name} ({_reason(proc)}): the manifest was changed "
                               "after it was signed.")
    log.info("%s: %s", sig.name, proc.stdout.decode(errors="replace").strip())
    return principals[0]
