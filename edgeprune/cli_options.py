"""Options several commands share (logging, model inputs, the device) and their config builders."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError

from edgeprune import events, progress
from edgeprune.config import CalibrationSettings, Profile, Target
from edgeprune.errors import EdgepruneError

if TYPE_CHECKING:
    from edgeprune.data import HFDataset


def _setup_logging(verbose: int, quiet: bool, log_json: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    fmt = "%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
    events.log_json(log_json)
    if verbose < 2:
        for noisy in ("llama.cpp", "gguf", "gguf.gguf_writer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    progress.set_enabled(not quiet and not log_json)  # a bar would break the JSON lines on stderr
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def logging_options(command):
    """-v/-q/--log-json on every command, so they can follow the command name like any other option."""

    @functools.wraps(command)
    def wrapper(*args, verbose: int, quiet: bool, log_json: bool, **kwargs):
        _setup_logging(verbose, quiet, log_json)
        return command(*args, **kwargs)

    wrapper = click.option(
        "--log-json", is_flag=True,
        help="Log one JSON object per line on stderr (named events with their fields: stages, candidates, the "
             "search's progress and ETA, the final error); no progress bars.")(wrapper)
    wrapper = click.option("-q", "--quiet", is_flag=True,
                           help="Only warnings, errors and the final summary; no progress bars.")(wrapper)
    return click.option("-v", "--verbose", count=True,
                        help="More log output (-vv: debug, llama.cpp's own logs included).")(wrapper)


def input_options(command):
    """The options `build` and `prune` share: the model, its calibration text, cache and output policy.
    The command receives `calib` (a file, an HFDataset or None) and `calibration_overrides` (for
    `with_calibration`)."""

    @functools.wraps(command)
    def wrapper(*args, calib: str | None, calib_config: str | None, calib_split: str | None,
                calib_column: str | None, calib_samples: int | None, heldout_samples: int | None,
                seq_len: int | None, calib_seed: int | None, **kwargs):
        source = calibration_source(calib, calib_config, calib_split, calib_column)
        overrides = {"samples": calib_samples, "heldout_samples": heldout_samples, "seq_len": seq_len,
                     "seed": calib_seed}
        return command(*args, calib=source, calibration_overrides=overrides, **kwargs)

    for option in reversed([
        click.option("-m", "--model", default=None,
                     help="HF directory, hub id or .gguf file. Default: the embedded SmolLM2-135M-Instruct."),
        click.option("--calib", metavar="FILE|hf:NAME", default=None,
                     help='Calibration text: .txt, .jsonl with "text" or chat "messages" per line, or hf:NAME, a '
                          "Hugging Face dataset (hub id or local directory). Default: self-generated."),
        click.option("--calib-config", default=None, help="hf: the dataset's configuration, e.g. wikitext-2-raw-v1."),
        click.option("--calib-split", default=None, help="hf: the split to read [default: train]."),
        click.option("--calib-column", default=None,
                     help="hf: the text or chat-messages column [default: text, else messages]."),
        click.option("--calib-samples", type=int, default=None, help="Calibration sequences (overrides the profile)."),
        click.option("--heldout-samples", type=int, default=None,
                     help="Held-out sequences for quality (overrides the profile)."),
        click.option("--seq-len", type=int, default=None, help="Tokens per sequence (overrides the profile)."),
        click.option("--calib-seed", type=int, default=None,
                     help="Seed of self-generated calibration text (overrides the profile)."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Artifact cache. Default: $EDGEPRUNE_CACHE or ~/.cache/edgeprune."),
        click.option("--force", is_flag=True, help="Replace a non-empty output directory."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow custom code from the model's repository (off by default)."),
    ]):
        wrapper = option(wrapper)
    return wrapper


def calibration_source(calib: str | None, config: str | None, split: str | None,
                       column: str | None) -> Path | HFDataset | None:
    """--calib and its hf: options -> a file path, an HFDataset, or None (self-generated)."""
    hf_flags = [flag for flag, value in (("--calib-config", config), ("--calib-split", split),
                                         ("--calib-column", column)) if value is not None]
    if calib is None or not calib.startswith("hf:"):
        if hf_flags:
            raise EdgepruneError(f"{', '.join(hf_flags)}: only meaningful with a dataset; add --calib hf:NAME.")
        return None if calib is None else Path(calib)
    from edgeprune.data import HFDataset  # here, not at the top: it imports torch, which `targets` does not need

    name = calib.removeprefix("hf:")
    if not name:
        raise EdgepruneError("--calib hf: needs a dataset after the colon: a hub id (hf:Salesforce/wikitext) "
                             "or a directory.")
    return HFDataset(name=name, config=config, split=split or "train", column=column)


def train_source(value: str | None) -> Path | HFDataset | None:
    """--train FILE or hf:NAME."""
    if value is None or not value.startswith("hf:"):
        return None if value is None else Path(value)
    from edgeprune.data import HFDataset

    if not value.removeprefix("hf:"):
        raise EdgepruneError("--train hf: needs a dataset after the colon: a hub id or a directory.")
    return HFDataset(name=value.removeprefix("hf:"))


# CalibrationSettings field -> the flag that overrides it, to name the flag in errors.
CALIBRATION_FLAGS = {"samples": "--calib-samples", "heldout_samples": "--heldout-samples", "seq_len": "--seq-len",
                     "seed": "--calib-seed"}


def with_calibration(profile: Profile, overrides: dict) -> Profile:
    """The profile with the given calibration flags in place of its [calibration] values."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return profile
    try:
        settings = CalibrationSettings(**(profile.calibration.model_dump() | given))
    except ValidationError as e:
        err = e.errors()[0]
        field = err["loc"][0]
        raise EdgepruneError(
            f"Invalid calibration override {CALIBRATION_FLAGS[field]} {given[field]}: {err['msg'].lower()}."
        ) from None
    return profile.model_copy(update={"calibration": settings})


def device_options(command=None, *, fleet: bool = False):
    """Where to measure, overriding the target's [device] table: the same keys as kebab-case flags.
    `fleet`: the command times on several devices at once when --device is given more than once."""
    if command is None:
        return functools.partial(device_options, fleet=fleet)

    @functools.wraps(command)
    def wrapper(*args, device: tuple[str, ...], identity: Path | None, known_hosts: Path | None,
                ssh_config: Path | None, accept_new_host_key: bool, ram_cap: bool, **kwargs):
        if len(device) > 1 and not fleet:
            raise EdgepruneError(f"--device is given {len(device)} times, but this command runs on one device; "
                                 "give one (only build times candidates on a fleet).")
        overrides = {"url": device[0] if device else None, "urls": device if len(device) > 1 else None,
                     "identity": identity, "known_hosts": known_hosts, "ssh_config": ssh_config,
                     "accept_new_host_key": accept_new_host_key, "ram_cap": ram_cap}
        return command(*args, device_overrides=overrides, **kwargs)

    where = ("local, ssh://[user@]host[:port] or qemu-aarch64" + (
        "; given more than once, a fleet of devices of the same hardware timing candidates in parallel" if fleet
        else "") + ". Default: the target's [device] url (or urls).")
    for option in reversed([
        click.option("-d", "--device", multiple=True, help=where),
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


def structured_options(command):
    """A structured method's settings (StructuredSettings' fields), passed on as given."""
    names = ("layer_ratio", "granularity", "head_ratio", "ffn_ratio", "allocation", "ffn_multiple")

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        given = {n: kwargs.pop(n) for n in names}
        if given["ffn_multiple"] is not None:
            given["ffn_multiple"] = int(given["ffn_multiple"])
        return command(*args, structured_overrides=given, **kwargs)

    for option in reversed([
        click.option("--layer-ratio", type=float, default=None,
                     help="Depth methods: share of layers (or sublayers) removed [default: 0.25]."),
        click.option("--granularity", type=click.Choice(["layer", "attention", "mlp"]), default=None,
                     help="Depth methods: remove whole layers, or only their attention or MLP [default: layer]."),
        click.option("--head-ratio", type=float, default=None, help="Width methods: share of query heads removed."),
        click.option("--ffn-ratio", type=float, default=None, help="Width methods: share of FFN channels removed."),
        click.option("--allocation", type=click.Choice(["uniform", "global"]), default=None,
                     help="Width methods: the same share in every layer, or ranked across layers as FLAP does "
                          "[default: uniform, which measured better here: benchmarks/structured.py]."),
        click.option("--ffn-multiple", type=click.Choice(["32", "256"]), default=None,
                     help="Width methods: FFN widths kept are multiples of this [default: 256, the K-quant block]."),
    ]):
        wrapper = option(wrapper)
    return wrapper
