"""Command line: thin click commands that build the config objects the library runs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgeprune import __version__, events
from edgeprune.cli_options import (
    device_options,
    input_options,
    logging_options,
    structured_options,
    train_source,
    with_calibration,
    with_device,
)
from edgeprune.cli_output import print_bench, print_prune, print_summary
from edgeprune.cli_setup import doctor, targets, toolchain
from edgeprune.config import load_profile, load_target
from edgeprune.errors import BudgetNotMet, EdgepruneError, system_refusal

if TYPE_CHECKING:
    from edgeprune.data import HFDataset

MIB = 1 << 20


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeprune")
def cli() -> None:
    """Prune and quantize Llama-family models until they meet an edge device's budget."""


@cli.command()
@click.option("-t", "--target", "target_name", required=True,
              help="Target name (see `edgeprune targets`) or a .toml path.")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=None,
              help="Output directory. Default: out/<target>.")
@click.option("--latency-budget", type=float, default=None, help="Override the SLO: p90 latency budget in seconds.")
@click.option("--speedup", type=float, default=None,
              help="Override the SLO: required speed-up over the unpruned model.")
@click.option("-p", "--profile", "profile_name", default="default", show_default=True,
              help="Search profile name or .toml path.")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), default=None,
              help="OpenSSH private key: sign the bundle's manifest.json with it (manifest.json.sig).")
@click.option("--runtime", "runtimes", multiple=True,
              help="A runtime to search (repeatable; the first times the baseline): replaces the target's "
                   "[runtime] allowed list. Runtimes: llama.cpp, onnxruntime.")
@click.option("--strategy", default=None,
              help="How the search walks the space: greedy (step by measured step) or pareto (predict every plan, "
                   "build and time only what can win). Default: the profile's [search] strategy.")
@click.option("--executor", default="local", show_default=True,
              help="Where candidates are built: local (this process), ray (a Ray started here, or the cluster "
                   "RAY_ADDRESS names), ray:HOST:PORT (a cluster's head, from one of its nodes) or ray://HOST:PORT "
                   "(Ray Client). A cluster's nodes share the --cache-dir and run the same edgeprune "
                   "(pip install 'edgeprune[ray]').")
@click.option("--recover/--no-recover", default=None,
              help="Recovery fine-tuning of the best candidates within budget (distilled toward the original; "
                   "same speed, better quality). Default: the profile's [recovery] enabled.")
@click.option("--recover-minutes", type=float, default=None,
              help="Training time per recovered candidate (implies --recover) [profile: 30].")
@click.option("--train", metavar="FILE|hf:NAME", default=None,
              help="Your own text for recovery, beside the calibration and self-generated windows (implies --recover).")
@input_options
@device_options(fleet=True)
@logging_options
def build(target_name: str, model: str | None, calib: Path | HFDataset | None, output_dir: Path | None,
          latency_budget: float | None, speedup: float | None, profile_name: str, sign_key: Path | None,
          runtimes: tuple[str, ...], strategy: str | None, executor: str, recover: bool | None,
          recover_minutes: float | None, train: str | None, cache_dir: Path | None, force: bool,
          trust_remote_code: bool, device_overrides: dict, calibration_overrides: dict) -> None:
    """Search pruning + quantization candidates until one meets the target's SLO; write it out.

    --latency-budget and --speedup replace the target's latency criteria (giving one drops the other).
    """
    from pydantic import ValidationError

    from edgeprune.build import BuildConfig, default_cache_dir
    from edgeprune.build import build as run_build
    from edgeprune.config import RecoverySettings, RuntimeTable, SearchSettings, first_error
    from edgeprune.executors import check_executor

    target = with_device(load_target(target_name), device_overrides)
    if latency_budget is not None or speedup is not None:
        target = target.with_budget(latency_budget, speedup)
    try:
        runtimes = RuntimeTable(allowed=runtimes).allowed
    except ValidationError as e:
        why = first_error(e).removeprefix("'allowed': ")
        raise EdgepruneError(f"Invalid --runtime: {why}.") from None
    profile = with_calibration(load_profile(profile_name), calibration_overrides)
    if strategy is not None:
        try:
            search = SearchSettings.model_validate(profile.search.model_dump() | {"strategy": strategy})
        except ValidationError as e:
            why = first_error(e).removeprefix("'strategy': ")
            raise EdgepruneError(f"Invalid --strategy: {why}.") from None
        profile = profile.model_copy(update={"search": search})
    if recover is False and (recover_minutes is not None or train is not None):
        raise EdgepruneError("--no-recover contradicts --recover-minutes and --train; drop one of them.")
    if recover or recover_minutes is not None or train is not None:
        given = {"enabled": True} | ({"minutes": recover_minutes} if recover_minutes is not None else {})
        try:
            recovery = RecoverySettings.model_validate(profile.recovery.model_dump() | given)
        except ValidationError as e:
            why = first_error(e).removeprefix("'minutes': ")
            raise EdgepruneError(f"Invalid --recover-minutes: {why}.") from None
        profile = profile.model_copy(update={"recovery": recovery})
    elif recover is False:
        profile = profile.model_copy(update={"recovery": profile.recovery.model_copy(update={"enabled": False})})
    try:
        check_executor(executor)
    except ValueError as e:
        raise EdgepruneError(f"Invalid --executor: {e}.") from None
    config = BuildConfig(
        target=target,
        profile=profile,
        model=model,
        calib=calib,
        output_dir=output_dir or Path("out") / target.name,
        cache_dir=cache_dir or default_cache_dir(),
        trust_remote_code=trust_remote_code,
        force=force,
        sign_key=sign_key,
        runtimes=runtimes,
        executor=executor,
        train=train_source(train),
    )
    result = run_build(config)
    print_summary(result)
    if not result.budget_met:
        outcome = result.outcome
        closest, limits = outcome.closest, outcome.limits_to_raise
        widen = (f"raise the profile's [search] {limits}" if limits else "widen the profile's search space")
        reachable = (f"; the best speed-up predicted within the search limits is {outcome.reachable:.2f}x"
                     if outcome.reachable is not None else "")
        raise BudgetNotMet(
            f"No candidate within the search limits meets the budget ({outcome.budget.describe()}): "
            f"the closest is {closest.id} ({closest.state.describe()}) at p90 {closest.bench.latency_p90:.3f} s, "
            f"{closest.bench.speedup:.2f}x faster than the unpruned model, measured{reachable}; the search "
            f"stopped: {outcome.stop_reason}; relax --latency-budget/--speedup or {widen} "
            f"(report: {result.output_dir}/report.html)."
        )


@cli.command()
# readable=False: an unreadable plan is load_plan_spec's one sentence, not click's usage error.
@click.option("--plan", "plan_path", type=click.Path(path_type=Path, readable=False), default=None,
              help="Plan file (.toml or .json): layers to drop, heads / FFN channels / sublayers to keep.")
@click.option("--method", default=None,
              help="A structured method (block-influence, angular-distance, loss-increase: layers or sublayers; "
                   "magnitude-sp, wanda-sp, taylor1, taylor2, flap: heads and FFN channels) instead of a plan, or a "
                   "sparse method applied after the plan (magnitude, wanda, sparsegpt; unstructured or N:M).")
@structured_options
@click.option("--sparsity", type=float, default=None, help="With --method: share of each weight row set to zero "
              "[default: 0.5].")
@click.option("--nm", default=None, help="With --method: N:M sparsity instead, e.g. 2:4 (N zeros in every M inputs).")
@click.option("--blocksize", type=int, default=None, help="SparseGPT: columns per OBS block [default: 128].")
@click.option("--percdamp", type=float, default=None,
              help="SparseGPT: Hessian dampening, a share of its mean diagonal [default: 0.01].")
@click.option("--mask-group", type=click.Choice(["row", "block"]), default=None,
              help="SparseGPT unstructured: 'row' gives every row exactly --sparsity [default]; 'block' is the "
                   "reference code's one threshold per column block.")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--runtime", default="llama.cpp", show_default=True,
              help="Whose model file to write: llama.cpp (a GGUF) or onnxruntime (model.onnx + its .data file).")
@click.option("--quant", default="",
              help="Quantization type. llama.cpp: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M [default], Q4_K_S, "
                   "Q3_K_M; onnxruntime: F32, INT8, INT4 [default] (blocks of 32), INT4_B128.")
@click.option("--recipe", default="default", show_default=True,
              help="Per-tensor types where K-quants cannot apply: a recipe of edgeprune/quantize/recipes.py, "
                   "e.g. iq4_nl-narrow (an unknown name lists them).")
@click.option("--imatrix/--no-imatrix", default=True, show_default=True,
              help="Calibrated quantization from the calibration text: llama.cpp's importance matrix, or GPTQ for "
                   "onnxruntime.")
@click.option("-p", "--profile", "profile_name", default="default", show_default=True,
              help="Profile whose calibration settings are used.")
@input_options
@logging_options
def prune(plan_path: Path | None, method: str | None, output_dir: Path, model: str | None, runtime: str, quant: str,
          recipe: str,
          imatrix: bool, calib: Path | HFDataset | None, profile_name: str, cache_dir: Path | None, force: bool,
          trust_remote_code: bool, calibration_overrides: dict, structured_overrides: dict,
          **sparse_options: object) -> None:
    """Apply a plan (a file, or chosen by a structured method) and/or a sparse method: write the pruned,
    quantized GGUF, its quality, and (for plans that keep one shape in every layer) an HF safetensors
    checkpoint plain transformers loads.

    Structured methods remove layers, sublayers, heads or FFN channels: the GGUF gets smaller and faster.
    Sparse methods zero weights inside each matrix; llama.cpp's CPU kernels do not skip zeros, so they
    shrink neither the GGUF nor its latency -- they serve sparse runtimes and 2:4 GPUs.
    """
    from pydantic import ValidationError

    from edgeprune.build import default_cache_dir
    from edgeprune.config import SparsitySpec, first_error
    from edgeprune.prune_job import PruneConfig
    from edgeprune.prune_job import prune as run_prune
    from edgeprune.sparse.methods import SPARSE_METHODS
    from edgeprune.structured import STRUCTURED_METHODS, StructuredSettings

    # --sparsity, --nm, --blocksize, --percdamp, --mask-group: SparsitySpec's fields, as given.
    given = {k: v for k, v in sparse_options.items() if v is not None}
    structured_given = {k: v for k, v in structured_overrides.items() if v is not None}
    structural = method in STRUCTURED_METHODS
    if method is not None and not structural and method not in SPARSE_METHODS:
        raise EdgepruneError(f"Unknown --method {method!r}: structured methods are {', '.join(STRUCTURED_METHODS)}; "
                             f"sparse methods are {', '.join(SPARSE_METHODS)}.")
    for options, ok, kind in ((given, method is not None and not structural, "sparse"),
                              (structured_given, structural, "structured")):
        if options and not ok:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in options)
            names = STRUCTURED_METHODS if kind == "structured" else SPARSE_METHODS
            raise EdgepruneError(f"{flags}: only meaningful with a {kind} method; add --method {'|'.join(names)}.")
    try:
        structured = StructuredSettings(method=method, **structured_given) if structural else None
        sparse = SparsitySpec(method=method, **given) if method is not None and not structural else None
        profile = with_calibration(load_profile(profile_name), calibration_overrides)
        config = PruneConfig(plan=plan_path, sparse=sparse, structured=structured, output_dir=output_dir,
                             profile=profile,
                             cache_dir=cache_dir or default_cache_dir(), model=model, runtime=runtime, quant=quant,
                             recipe=recipe,
                             imatrix=imatrix, calib=calib, trust_remote_code=trust_remote_code, force=force)
    except ValidationError as e:
        raise EdgepruneError(f"Invalid option: {first_error(e)}.") from None
    print_prune(run_prune(config))


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path, readable=False), required=True,
              help="Plan file (.toml or .json), as `prune --plan` takes it.")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--recover-method", type=click.Choice(["lora", "full"]), default=None,
              help="LoRA adapters on every decoder linear layer, merged after [profile: lora], or every decoder "
                   "weight trained.")
@click.option("--recover-minutes", type=float, default=None, help="Training time (wall clock) [profile: 30].")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps, if the time lasts.")
@click.option("--train", "train", metavar="FILE|hf:NAME", default=None,
              help="Your own text to distil on (.txt, .jsonl with text or chat messages, or a Hugging Face dataset), "
                   "beside the calibration and self-generated windows.")
@click.option("--extra-samples", type=int, default=None,
              help="Windows self-generated for training beyond the calibration ones [profile: 128].")
@click.option("--learning-rate", type=float, default=None, help="Peak learning rate [2e-4 LoRA, 5e-5 full].")
@click.option("--lora-rank", type=int, default=None, help="LoRA rank [profile: 16].")
@click.option("--temperature", type=float, default=None, help="Distillation temperature [profile: 1].")
@click.option("--runtime", default="llama.cpp", show_default=True,
              help="Whose model file to write: llama.cpp (a GGUF) or onnxruntime.")
@click.option("--quant", default="", help="Quantization type, as `prune --quant` [default: the runtime's].")
@click.option("-p", "--profile", "profile_name", default="default", show_default=True,
              help="Profile whose calibration and [recovery] settings are used.")
@input_options
@logging_options
def recover(plan_path: Path, output_dir: Path, train: str | None, runtime: str, quant: str, profile_name: str,
            model: str | None, calib: Path | HFDataset | None, cache_dir: Path | None, force: bool,
            trust_remote_code: bool, calibration_overrides: dict, **recovery_options: object) -> None:
    """Prune with a plan, then distil the pruned model back toward the original (recovery fine-tuning):
    KL divergence to the reference's next-token distribution on calibration, self-generated and your
    own text, never on the held-out windows quality is measured on. Writes the recovered, quantized
    model with its quality before and after. A killed run resumes from its last checkpoint."""
    from pydantic import ValidationError

    from edgeprune.build import default_cache_dir
    from edgeprune.config import RecoverySettings, first_error
    from edgeprune.prune_job import PruneConfig
    from edgeprune.prune_job import prune as run_prune

    flags = {"recover_method": "method", "recover_minutes": "minutes"}
    given = {flags.get(k, k): v for k, v in recovery_options.items() if v is not None}
    try:
        profile = with_calibration(load_profile(profile_name), calibration_overrides)
        settings = RecoverySettings(**(profile.recovery.model_dump() | given))
        config = PruneConfig(plan=plan_path, output_dir=output_dir, profile=profile,
                             cache_dir=cache_dir or default_cache_dir(), model=model, runtime=runtime, quant=quant,
                             calib=calib, recovery=settings, train=train_source(train),
                             trust_remote_code=trust_remote_code, force=force)
    except ValidationError as e:
        raise EdgepruneError(f"Invalid option: {first_error(e)}.") from None
    print_prune(run_prune(config))


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
@logging_options
def inspect(file: Path, as_json: bool) -> None:
    """Show a GGUF's structure, tensor types, bits per weight, tokenizer and edgeprune provenance."""
    import json

    from edgeprune.inspection import inspect_gguf, render

    info = inspect_gguf(file)
    click.echo(json.dumps(info.to_dict(), indent=1) if as_json else render(info))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-n", "--answer-tokens", type=click.IntRange(min=1, max=512), default=16, show_default=True,
              help="Tokens of the greedy answer compared with the host's.")
@click.option("-r", "--repetitions", type=click.IntRange(min=1, max=100), default=3, show_default=True,
              help="Timed runs of the SLO workload (on a device of the target's architecture).")
@click.option("--trusted-key", type=click.Path(path_type=Path), default=None,
              help="OpenSSH public key (or allowed_signers file): the manifest must be signed by it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@device_options
@logging_options
def verify(bundle: Path, answer_tokens: int, repetitions: int, trusted_key: Path | None, as_json: bool,
           device_overrides: dict) -> None:
    """Check a bundle's signature (with --trusted-key) and checksums, run its binaries on a device (the host
    must rate each token of their greedy answer within its top 5 and 1 logit of its best), and on the target's
    hardware time the SLO workload against the budget.

    Default device: this machine if it has the bundle's architecture, else its emulator (qemu-aarch64).
    Exit status 0: verified (PASS); 1: the signature, a file, the answer or the budget fails; 2: bad input.
    """
    import json

    from edgeprune.config import DeviceConfig
    from edgeprune.verify import VerificationFailed
    from edgeprune.verify import verify as run_verify

    url = device_overrides.pop("url")
    config = DeviceConfig().overridden(url, **device_overrides) if url or any(device_overrides.values()) else None
    try:
        r = run_verify(bundle, config, answer_tokens, repetitions=repetitions, trusted_key=trusted_key)
    except VerificationFailed as e:
        click.echo(f"FAIL: {e}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=1))
        return
    ans = r.answer
    speed = f", {ans.device_decode_tok_s:.1f} tok/s decode" if ans.device_decode_tok_s else ""
    click.echo(f"Signature:  {r.signature}")
    click.echo(f"Files:      {r.files_checked} match manifest.json")
    click.echo(f"Programs:   {', '.join(ans.programs)} run on {r.device} ({r.arch})")
    a = ans.agreement
    agree = f"{a['positions']} greedy tokens, {a['top1']} of them the host's first choice"
    if a["top1"] < a["positions"]:
        w = a["worst"]
        top = f"its top {a['top_k']} and " if a["top_k"] else ""
        agree += (f", the rest within {top}{a['gap_allowed']:g} logit of its best (largest gap "
                  f"{a['max_gap']:.3f} at token {w['token']}: {w['device']!r} where the host prefers {w['host']!r})")
    click.echo(f"Answer:     {agree}, in {ans.device_seconds:.1f} s{speed}: {ans.prompt!r} -> {ans.device_text!r}")
    if r.slo is None:
        click.echo(f"Budget:     not judged: {r.slo_skipped}")
    else:
        s = r.slo["summary"]
        click.echo(f"Budget:     {r.slo['budget']['description']}: p90 {s['latency_p90_s']:.3f} s, TTFT "
                   f"{s['ttft_p50_s'] * 1000:.0f} ms, {s['decode_tok_s_p50']:.1f} tok/s decode, peak RSS "
                   f"{r.slo['peak_rss_bytes'] / MIB:.0f} MiB ({s['repetitions']} runs, {r.slo['threads']} threads); "
                   + ("written to report.json" if r.written_back else "not written into the signed bundle"))
    click.echo(f"PASS:       {r.bundle} verified on {r.device} in {r.seconds:.1f} s")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target_name", required=True,
              help="Target name (see `edgeprune targets`) or a .toml path: its SLO workload, threads and budget.")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="The unpruned GGUF, timed alongside (alternating) to measure and judge a speed-up.")
@click.option("-r", "--repetitions", type=click.IntRange(min=1, max=1000), default=5, show_default=True,
              help="Timed runs (after one warm-up run).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Cache (llama.cpp builds for ssh/qemu devices). Default: $EDGEPRUNE_CACHE or ~/.cache/edgeprune.")
@click.option("--json", "as_json", is_flag=True, help="Print the full benchmark record as JSON.")
@device_options
@logging_options
def bench(model: Path, target_name: str, baseline: Path | None, repetitions: int, cache_dir: Path | None,
          as_json: bool, device_overrides: dict) -> None:
    """Time MODEL (a GGUF, or an ONNX file beside its .onnx.data) with the target's SLO workload on its
    device (or --device) and judge it against the budget.

    Exit status 0: within budget (or nothing to judge, e.g. emulated); 1: over budget; 2: bad input.
    """
    import json

    from edgeprune.bench import bench as run_bench
    from edgeprune.build import default_cache_dir
    from edgeprune.search.budget import EMULATED, MEETS

    target = with_device(load_target(target_name), device_overrides)
    r = run_bench(model, target, cache_dir or default_cache_dir(), baseline, repetitions)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=1))
    else:
        print_bench(r)
    if r.verdict not in (MEETS, EMULATED, "no criterion to judge"):
        sys.exit(1)


for _command in (targets, toolchain, doctor):
    cli.add_command(_command)


def _fail(message: str, code: int) -> None:
    """The command's last line: one sentence on stderr (a JSON event with --log-json), and its exit code."""
    if events.json_enabled():
        logging.getLogger("edgeprune").error(message, extra={"event": events.ERROR, "fields": {"exit_code": code}})
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BudgetNotMet as e:
        _fail(str(e), 1)
    except EdgepruneError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except OSError as e:  # last resort: a full disk or a refused write the code did not name more precisely
        refusal = system_refusal(e)
        if refusal is None:
            raise  # anything else is a bug: keep its traceback
        logging.getLogger(__name__).debug("traceback of the error below (-vv)", exc_info=True)
        _fail(refusal, 2)
