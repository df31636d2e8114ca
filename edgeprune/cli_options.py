"""Options several commands share (logging, model inputs, the device) and their config builders."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import click

from edgeprune import progress
from edgeprune.config import Target


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    fmt = "%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
    if verbose < 2:
        for noisy in ("llama.cpp", "gguf", "gguf.gguf_writer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    progress.set_enabled(not quiet)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def logging_options(command):
    """-v/-q on every command, so they can follow the command name like any other option."""

    @functools.wraps(command)
    def wrapper(*args, verbose: int, quiet: bool, **kwargs):
        _setup_logging(verbose, quiet)
        return command(*args, **kwargs)

    wrapper = click.option("-q", "--quiet", is_flag=True,
                           help="Only warnings, errors and the final summary; no progress bars.")(wrapper)
    return click.option("-v", "--verbose", count=True,
                        help="More log output (-vv: debug, llama.cpp's own logs included).")(wrapper)


def input_options(command):
    """The options `build` and `prune` share: the model, its calibration text, cache and output policy."""
    for option in reversed([
        click.option("-m", "--model", default=None,
                     help="HF directory, hub id or .gguf file. Default: the embedded SmolLM2-135M-Instruct."),
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help='Calibration text (.txt, or .jsonl with a "text" field). Default: self-generated.'),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Artifact cache. Default: $EDGEPRUNE_CACHE or ~/.cache/edgeprune."),
        click.option("--force", is_flag=True, help="Replace a non-empty output directory."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow custom code from the model's repository (off by default)."),
    ]):
        command = option(command)
    return command


def device_options(command):
    """Where to measure, overriding the target's [device] table: the same keys as kebab-case flags."""

    @functools.wraps(command)
    def wrapper(*args, device: str | None, identity: Path | None, known_hosts: Path | None,
                ssh_config: Path | None, accept_new_host_key: bool, ram_cap: bool, **kwargs):
        overrides = {"url": device, "identity": identity, "known_hosts": known_hosts, "ssh_config": ssh_config,
                     "accept_new_host_key": accept_new_host_key, "ram_cap": ram_cap}
        return command(*args, device_overrides=overrides, **kwargs)

    for option in reversed([
        click.option("-d", "--device", default=None,
                     help="local, ssh://[user@]host[:port] or qemu-aarch64. Default: the target's [device] url."),
        click.option("--identity", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="ssh: private key file (default: OpenSSH's own choice: ~/.ssh/config, agent, id_*)."),
        click.option("--known-hosts", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="ssh: known_hosts file that holds the device's host key (default: ~/.ssh/known_hosts)."),
        click.option("--ssh-config", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="ssh: config file to use instead of ~/.ssh/config."),
        click.option("--accept-new-host-key", is_flag=True,
                     help="ssh: trust a host key seen for the first time (trust on first use); a changed key is "
                          "still refused. Host keys are verified otherwise."),
        click.option("--ram-cap", is_flag=True,
                     help="local: kill a run that outgrows the SLO's RAM ceiling and judge it over budget."),
    ]):
        wrapper = option(wrapper)
    return wrapper


def with_device(target: Target, overrides: dict) -> Target:
    url = overrides.pop("url")
    if url is None and not any(overrides.values()):
        return target
    return target.with_device(target.device.overridden(url, **overrides))
