"""Memory preflight: before any work, a job's estimated peak RAM and disk (`footprint.py`) against
what the machine can give (`limits.py`), so that a job that cannot fit is refused in one sentence,
naming the numbers and the setting that lowers them, instead of being OOM-killed an hour in."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edgeprune.errors import EdgepruneError
from edgeprune.footprint import ACTIVATION_BUDGET, CANDIDATES, KNOBS, Estimate, KnobKind, Phase, Work, estimate
from edgeprune.limits import MEMORY_LIMIT_ENV, Limits, fmt, machine_limits

if TYPE_CHECKING:
    from edgeprune.config import CalibrationSettings, RecoverySettings
    from edgeprune.footprint import Command
    from edgeprune.models.weights import WeightStore

log = logging.getLogger(__name__)


def _home(path: Path) -> str:
    text = str(path)
    home = str(Path.home())
    return "~" + text[len(home):] if text == home or text.startswith(home + os.sep) else text


def summary(estimate: Estimate, limits: Limits) -> str:
    """One line for the log."""
    line = (f"memory preflight: peak RAM ≈ {fmt(estimate.peak_ram)} ({estimate.peak.name}) of "
            f"{fmt(limits.memory)} available; disk ≈ {fmt(sum(estimate.cache_disk.values()))} of "
            f"{fmt(limits.cache.free)} free in {_home(limits.cache.path)}")
    if limits.output is not None and estimate.output_disk:
        line += f", {fmt(sum(estimate.output_disk.values()))} in {_home(limits.output.path)}"
    return line


def _method_advice(command: Command) -> str:
    from edgeprune.analysis.methods import LAYER_IMPORTANCE, UNIT_IMPORTANCE
    from edgeprune.structured.methods import STRUCTURED_METHODS, DepthMethod

    layerwise = [n for n, m in STRUCTURED_METHODS.items()
                 if (LAYER_IMPORTANCE[m.importance] if isinstance(m, DepthMethod)
                     else UNIT_IMPORTANCE[m.importance]).needs not in ("loss", "gradients")]
    names = ", ".join(layerwise)
    if command == "prune":
        return f"choose a method that runs layer by layer (--method {names})"
    return f"choose a profile whose depth_method and width_method run layer by layer ({names})"


def _advice(kind: KnobKind, command: Command) -> str:
    return {
        "calibration": "use fewer or shorter calibration windows (--calib-samples, --seq-len)",
        "heldout": "use fewer or shorter held-out windows (--heldout-samples, --seq-len)",
        "seq_len": "use shorter windows (--seq-len)",
        "method": _method_advice(command),
        "sparse": "use --method wanda or magnitude, which keep no Hessian",
        "self_generated": "give calibration text (--calib FILE or hf:NAME) instead of self-generating it",
        "candidates": "keep fewer candidates (max_candidates in the profile)",
        "recovery": "recover with --recover-method lora and a smaller [recovery] batch_size, or not at all "
                    "(recovery holds the whole pruned model: LoRA in its stored dtype, full fine-tuning in fp32)",
    }[kind]


def _top(parts: Mapping[str, int], n: int = 2) -> str:
    biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {fmt(size)}" for name, size in biggest if size)


PREFLIGHT_ENV = "EDGEPRUNE_PREFLIGHT"


def preflight(store: WeightStore, calibration: CalibrationSettings, work: Work, cache_dir: Path,
              output_dir: Path | None) -> Estimate:
    """Estimate, log, and refuse what does not fit: before any work."""
    from edgeprune.models.streamed import activation_budget

    limits = machine_limits(cache_dir, output_dir)
    result = fitting_estimate(store, calibration, work, limits, activation_budget())
    log.info("%s", summary(result, limits))
    try:
        check(result, limits)
    except EdgepruneError as e:
        if os.environ.get(PREFLIGHT_ENV) != "warn":
            raise
        # The estimate is an estimate: a user who knows better goes on, and a real shortage then
        # ends in the one-sentence out-of-memory or disk-full error of the step that hits it.
        log.warning("%s (%s=warn: going on)", e, PREFLIGHT_ENV)
    return result


def recovery_preflight(store: WeightStore, settings: RecoverySettings, threads: int, cache_dir: Path,
                       flag: str) -> None:
    """Before any work: refuse a CPU recovery that would train on too little text in its budget."""
    from edgeprune.recover.pace import check_pace, recovery_pace

    try:
        check_pace(recovery_pace(store, settings, threads, cache_dir), settings, store.parameters, flag)
    except EdgepruneError as e:
        if os.environ.get(PREFLIGHT_ENV) != "warn":
            raise
        log.warning("%s (%s=warn: going on)", e, PREFLIGHT_ENV)


def fitting_estimate(store: WeightStore, calibration: CalibrationSettings, work: Work, limits: Limits,
                     activation_budget: int = ACTIVATION_BUDGET) -> Estimate:
    """The estimate of `work`, or of `work.bounded()` when the disk cannot hold `work`'s: a build
    whose cache cannot keep every candidate removes each one's file once judged (and if even that
    does not fit, the refusal names the smaller need)."""
    result = estimate(store, calibration, work, activation_budget)
    bounded = work.bounded()
    if work.command != "build" or bounded == work or _fits_disk(result, limits):
        return result
    log.info("the cache cannot hold all %d candidates (%s of disk): each candidate's file is removed once judged "
             "(a later build rebuilds those it needs)", work.candidates, fmt(sum(result.cache_disk.values())))
    return estimate(store, calibration, bounded, activation_budget)


def _fits_disk(estimate: Estimate, limits: Limits) -> bool:
    try:
        _check_disk(estimate, limits)
    except EdgepruneError:
        return False
    return True


def check(estimate: Estimate, limits: Limits) -> None:
    """Refuse, in one sentence naming the numbers and what lowers them, a job the machine cannot hold."""
    who = f"edgeprune {estimate.command}"
    peak = estimate.peak
    if peak.total > limits.memory:
        # What no setting lowers (baseline, a layer, the largest tensor): the phase where it is largest.
        def fixed(phase: Phase) -> int:
            return sum(v for k, v in phase.ram.items() if k not in KNOBS)

        floor = max(estimate.phases, key=fixed)
        if fixed(floor) > limits.memory:
            inherent = _top({k: v for k, v in floor.ram.items() if k not in KNOBS})
            advice = ("no setting lowers it, so it takes a machine with more memory" if floor is peak else
                      f"no setting lowers the {fmt(fixed(floor))} of {floor.name} ({inherent}), so it takes a machine "
                      "with more memory")
            if limits.memory_source.startswith(MEMORY_LIMIT_ENV):
                advice += f" or a higher {MEMORY_LIMIT_ENV}"
        else:
            reducible = {k: v for k, v in peak.ram.items() if k in KNOBS and v}
            advice = _advice(KNOBS[max(reducible, key=reducible.get)], estimate.command)
        raise EdgepruneError(
            f"{who} would need about {fmt(peak.total)} of memory at its peak ({peak.name}: {_top(peak.ram)}) but "
            f"{fmt(limits.memory)} is available ({limits.memory_source}): {advice}.")

    _check_disk(estimate, limits)


def _finished_stage_bytes(cache_dir: Path) -> int:
    stages = cache_dir / "stages"
    if not stages.is_dir():
        return 0
    return sum(p.stat().st_size for p in stages.rglob("*") if p.is_file() and not p.is_symlink())


def _check_disk(estimate: Estimate, limits: Limits) -> None:
    who = f"edgeprune {estimate.command}"
    cache, output = sum(estimate.cache_disk.values()), sum(estimate.output_disk.values())
    same = limits.output is not None and limits.output.device == limits.cache.device
    on_cache = dict(estimate.cache_disk) | (estimate.output_disk if same else {})
    needs = [(limits.cache, cache + (output if same else 0), on_cache)]
    if limits.output is not None and not same:
        needs.append((limits.output, output, dict(estimate.output_disk)))
    for disk, need, parts in needs:
        if need <= disk.free:
            continue
        is_cache = disk is limits.cache
        where = "--cache-dir" if is_cache else "--output-dir"
        advice = f"free space there or point {where} at a larger disk"
        top = max(parts, key=parts.get)
        # max_candidates does not lower the candidates of a prune (one) or of a build that evicts (three).
        if top in KNOBS and is_cache and not (top == CANDIDATES and (estimate.command == "prune" or estimate.evicts)):
            advice += f", or {_advice(KNOBS[top], estimate.command)}"
        # The estimate is of all the build will write; a resumed build has written part of it already.
        done = _finished_stage_bytes(disk.path) if is_cache else 0
        if done:
            advice += (f"; the cache already holds {fmt(done)} of finished stages, and if they are this job's "
                       f"(a resumed run), {PREFLIGHT_ENV}=warn goes on")
        raise EdgepruneError(
            f"{who} would need about {fmt(need)} of disk in {disk.path} ({_top(parts)}) but only {fmt(disk.free)} "
            f"is free there: {advice}.")
