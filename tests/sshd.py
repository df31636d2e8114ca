"""A real OpenSSH server on 127.0.0.1 for the tests: throw-away host and user keys, a free port."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class Sshd:
    port: int
    user: str
    identity: Path  # the user's private key
    known_hosts: Path  # holds the server's real host key
    host_pub: str
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeprune-test", "-f", str(path)],
                   check=True)
    return path.with_suffix(".pub").read_text().split()[1]


def start_sshd(root: Path, keys_of: Sshd | None = None) -> Sshd:
    """`keys_of`: another server whose host key and user key this one shares (a fleet of two
    devices one key and one known_hosts file reach: it lists both)."""
    if not Path(SSHD).exists():
        raise RuntimeError("sshd is missing: install the Debian package openssh-server (.ci/run does).")
    root.mkdir(parents=True, exist_ok=True)
    if keys_of is None:
        host_key, user_key = root / "host_key", root / "user_key"
        host_pub = keygen(host_key)
        keygen(user_key)
    else:
        host_key, user_key, host_pub = keys_of.identity.parent / "host_key", keys_of.identity, keys_of.host_pub
    (root / "authorized_keys").write_text(user_key.with_suffix(".pub").read_text())
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {root}/authorized_keys\n"
        f"PidFile {root}/sshd.pid\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\n")
    known = root / "known_hosts"
    others = keys_of.known_hosts.read_text() if keys_of else ""
    known.write_text(others + f"[127.0.0.1]:{port} ssh-ed25519 {host_pub}\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stderr=open(root / "sshd.log", "w"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return Sshd(port, getpass.getuser(), user_key, known, host_pub, proc)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}")
