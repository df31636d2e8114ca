"""A real device over SSH: `ssh://[user@]host[:port]`.

Runs the system's OpenSSH client, so the user's ~/.ssh/config, keys, agent and known_hosts apply
as they do for `ssh` itself; `identity`, `known_hosts` and `ssh_config` replace them. Host keys
are always verified (StrictHostKeyChecking=yes); `accept_new_host_key` is the one documented
opt-out, and it still refuses a key that changed. BatchMode: never a password prompt that would
hang a build. Connections time out and are retried a bounded number of times; every argument of
a remote command is quoted. Files go to one temporary directory on the device, copied once per
session and removed at the end.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shlex
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edgeprune.config import DeviceConfig
from edgeprune.devices.base import TIMEOUT_S, Device, DeviceError, DeviceUnreachable, normalize_arch
from edgeprune.errors import EdgepruneError

log = logging.getLogger(__name__)

SSH_FAILED = 255  # ssh's own exit status: connection, authentication or host key
_HOST_KEY_CHANGED = "REMOTE HOST IDENTIFICATION HAS CHANGED"
_HOST_KEY_FAILED = "Host key verification failed"
_AUTH_FAILED = "Permission denied"
_RESUME = "built candidates are cached, so the same command resumes where this one stopped"


@dataclass(frozen=True)
class SshAddress:
    user: str | None
    host: str
    port: int | None

    @classmethod
    def parse(cls, url: str) -> SshAddress:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "ssh" or not parts.hostname or port == -1 or parts.path not in ("", "/") \
                or parts.query or parts.fragment or parts.password:
            raise EdgepruneError(f"Device '{url}' is not of the form ssh://[user@]host[:port].")
        return cls(parts.username, parts.hostname, port)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def known_hosts_name(self) -> str:
        return f"[{self.host}]:{self.port}" if self.port and self.port != 22 else self.host


class SshDevice(Device):
    scheme = "ssh"

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        self.address = SshAddress.parse(config.url)
        self._info: tuple[str, int, str] | None = None
        self._workdir: str | None = None
        self._staged: dict[tuple[str, int, int], str] = {}  # a file by (path, size, mtime)
        self._trees: dict[str, str] = {}  # a directory by the hash of its path and listing

    # -- connection --------------------------------------------------------------------------

    def ssh_argv(self) -> list[str]:
        c = self.config
        argv = ["ssh"]
        if c.ssh_config is not None:
            argv += ["-F", str(c.ssh_config.expanduser())]
        argv += ["-o", "BatchMode=yes",
                 "-o", f"StrictHostKeyChecking={'accept-new' if c.accept_new_host_key else 'yes'}",
                 "-o", f"ConnectTimeout={math.ceil(c.connect_timeout_s)}",
                 "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if c.identity is not None:
            argv += ["-i", str(c.identity.expanduser()), "-o", "IdentitiesOnly=yes"]
        if c.known_hosts is not None:
            argv += ["-o", f'UserKnownHostsFile="{c.known_hosts.expanduser()}"']
        if self.address.port is not None:
            argv += ["-p", str(self.address.port)]
        return [*argv, "--", self.address.destination]

    def _known_hosts_file(self) -> str:
        return str(self.config.known_hosts) if self.config.known_hosts else "your known_hosts (~/.ssh/known_hosts)"

    def _refusal(self, stderr: str) -> EdgepruneError | None:
        """A failure that retrying cannot fix, as one sentence; None for a connection problem."""
        name, url = self.address.known_hosts_name, self.url
        if _HOST_KEY_CHANGED in stderr:
            return DeviceError(
                f"The host key of {name} differs from the one in {self._known_hosts_file()}: refusing to connect to "
                f"{url} (another machine, or someone in between). If the device was reinstalled, check its new "
                f"fingerprint, then replace its line (ssh-keygen -R '{name}').")
        if _HOST_KEY_FAILED in stderr:
            return DeviceError(
                f"The host key of {name} is not in {self._known_hosts_file()}: refusing to connect to {url}. Check "
                f"its fingerprint and add it (ssh-keyscan -p {self.address.port or 22} {self.address.host}), or "
                "pass --accept-new-host-key to trust it on first use.")
        if _AUTH_FAILED in stderr:
            return DeviceError(f"{url} refused the login ({stderr.strip().splitlines()[-1]}): give the key with "
                               "--identity FILE, or load it into ssh-agent.")
        return None

    def exec(self, argv: list[str], what: str, stdin: bytes | Path | None = None,
             timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        command = shlex.join(argv)
        attempts = self.config.retries + 1
        for attempt in range(1, attempts + 1):
            log.debug("ssh %s: %s", self.address.destination, command)
            try:
                if isinstance(stdin, Path):
                    with stdin.open("rb") as f:
                        proc = subprocess.run([*self.ssh_argv(), command], stdin=f, capture_output=True,
                                              timeout=timeout)
                else:
                    proc = subprocess.run([*self.ssh_argv(), command], input=stdin or b"", capture_output=True,
                                          timeout=timeout)
            except subprocess.TimeoutExpired:
                raise DeviceUnreachable(
                    f"{what} did not finish within {timeout:g} s on {self.url}; {_RESUME}.") from None
            except FileNotFoundError:
                raise EdgepruneError("The OpenSSH client (ssh) is not installed: install the Debian package "
                                     "openssh-client.") from None
            stderr = proc.stderr.decode(errors="replace")
            if proc.returncode != SSH_FAILED:
                break
            if (refusal := self._refusal(stderr)) is not None:
                raise refusal
            last = (stderr.strip().splitlines() or ["ssh failed without a message"])[-1]
            if not _looks_like_connection_failure(stderr):
                break  # the remote program itself exited 255
            if attempt == attempts:
                raise DeviceUnreachable(f"Cannot reach {self.url} after {attempts} attempt(s): {last}. Check that the "
                                  f"device is on and sshd listens there; {_RESUME}.")
            log.warning("ssh to %s failed (%s); retrying (%d/%d)", self.url, last, attempt, attempts - 1)
            time.sleep(min(2.0 ** (attempt - 1), 10.0))
        if proc.returncode != 0:
            tail = (stderr.strip().splitlines() or ["no output"])[-1]
            raise DeviceError(f"{what} failed on {self.url} (exit {proc.returncode}): {tail}")
        return proc

    # -- what the device is --------------------------------------------------------------------

    def _describe(self) -> tuple[str, int, str]:
        if self._info is None:
            script = ("uname -m; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN; "
                      "grep -m1 -E '^(model name|Hardware|CPU part)' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || true")
            out = self.exec(["sh", "-c", script], "probing the device").stdout.decode(errors="replace").splitlines()
            try:
                self._info = (normalize_arch(out[0]), int(out[1]), out[2].strip() if len(out) > 2 else "")
            except (IndexError, ValueError):
                raise DeviceError(f"{self.url} did not say what it is (uname -m, nproc): {out!r}.") from None
        return self._info

    @property
    def python(self) -> str | None:
        return self.config.python

    @property
    def arch(self) -> str:
        return self._describe()[0]

    @property
    def cores(self) -> int:
        return self._describe()[1]

    @property
    def cpu(self) -> str:
        return self._describe()[2]

    # -- files ---------------------------------------------------------------------------------

    def stage(self, path: Path, executable: bool = False) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._staged:
            tag = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
            remote = f"{self._work_directory()}/{tag}-{path.name}"
            log.info("copying %s (%.1f MiB) to %s", path.name, st.st_size / 2**20, self.url)
            script = 'cat > "$1" && if [ "$2" = x ]; then chmod +x "$1"; fi'
            self.exec(["sh", "-c", script, "edgeprune-copy", remote, "x" if executable else "-"],
                      f"copying {path.name}", stdin=path)
            self._staged[key] = remote
        return self._staged[key]

    def stage_tree(self, directory: Path) -> str:
        # One tar stream, not a copy per file: a bundle's Python is thousands of files.
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        listing = [(str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        key = hashlib.sha256(repr((str(directory.resolve()), listing)).encode()).hexdigest()
        if key not in self._trees:
            remote = f"{self._work_directory()}/{key[:12]}-{directory.name}"
            log.info("copying %s (%d files, %.1f MiB) to %s", directory.name, len(files),
                     sum(size for _, size, _ in listing) / 2**20, self.url)
            with tempfile.TemporaryDirectory() as tmp:
                archive = Path(tmp) / "tree.tar"
                with tarfile.open(archive, mode="w") as tar:
                    for path, (name, _, _) in zip(files, listing, strict=True):
                        tar.add(path, arcname=name, recursive=False)
                self.exec(["sh", "-c", 'mkdir -p -- "$1" && tar -xf - -C "$1"', "edgeprune-copy", remote],
                          f"copying {directory.name}", stdin=archive)
            self._trees[key] = remote
        return self._trees[key]

    def _work_directory(self) -> str:
        if self._workdir is None:
            mktemp = ["sh", "-c", 'mktemp -d "${TMPDIR:-/tmp}/edgeprune.XXXXXX"']
            self._workdir = self.exec(mktemp, "creating a work directory").stdout.decode().strip()
        return self._workdir

    def close(self) -> None:
        if self._workdir is not None:
            workdir, self._workdir = self._workdir, None
            self._staged.clear()
            self._trees.clear()
            try:
                self.exec(["rm", "-rf", "--", workdir], "removing the work directory", timeout=60)
            except EdgepruneError as e:
                log.warning("could not remove %s on %s: %s", workdir, self.url, e)


def _looks_like_connection_failure(stderr: str) -> bool:
    markers = ("Connection refused", "Connection timed out", "timed out", "No route to host", "Could not resolve",
               "Connection reset", "Connection closed", "Network is unreachable", "kex_exchange_identification",
               "banner exchange", "Broken pipe", "Name or service not known", "Temporary failure")
    return any(m in stderr for m in markers)
