"""How much can one speed-up measurement be trusted on this machine? Paired vs separate runs.

Builds (or reuses from the cache) the embedded model's unpruned Q4_K_M and a depth-pruned
candidate, then estimates the candidate's speed-up repeatedly in two ways:

- separate: the baseline and the candidate each timed in their own runner process, one after
  the other; speed-up = baseline p50 / candidate p50;
- paired:   both loaded in one runner process and timed in alternation (what `edgeprune build`
  does); speed-up = median ratio of adjacent runs.

Prints a table and writes JSON (default benchmarks/results/measurement_noise.json).

    .venv/bin/python benchmarks/measurement_noise.py [--rounds 6] [--drop-layers 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edgeprune.build import default_cache_dir
from edgeprune.config import load_profile, load_target
from edgeprune.devices import get_device
from edgeprune.measure import Workload
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import CandidateModel, calibration_splits, importance_of
from edgeprune.prune import ModelShape
from edgeprune.quantize import QuantSpec
from edgeprune.runtimes.registry import get_runtime
from edgeprune.search import SearchSpace, State
from edgeprune.stages import StageRunner


def stats(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "cv": statistics.stdev(values) / mean if len(values) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--drop-layers", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "measurement_noise.json")
    args = parser.parse_args()

    cache = default_cache_dir()
    profile, target = load_profile("default"), load_target("demo")
    runner = StageRunner(cache / "stages")
    reference = load_reference(resolve_source(None), cache)
    splits = calibration_splits(reference, profile.calibration, None, runner)
    importance = importance_of(reference, splits, profile.search, runner)
    device = get_runtime().runner(get_device("local"))
    threads = min(target.hardware.cores, device.device.cores)
    space = SearchSpace(ModelShape.from_config(reference.config), importance, profile.search)
    models = {}
    for name, state in (("baseline", State(0, None)), ("candidate", State(args.drop_layers, None))):
        quant = QuantSpec(profile.search.quant, "default", profile.search.imatrix)
        stage = CandidateModel(reference, space.plan(state), quant, splits, threads)
        models[name] = stage.file(runner.run(stage))
    prompt = tuple((splits.heldout.flatten().tolist() * 2)[: target.slo.prompt_tokens])
    workload = Workload(prompt, target.slo.answer_tokens, threads, profile.benchmark.warmup,
                        profile.benchmark.repetitions)

    separate, paired, t_sep, t_pair = [], [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        base = device.benchmark(models["baseline"], workload)
        cand = device.benchmark(models["candidate"], workload)
        t_sep.append(time.perf_counter() - t0)
        separate.append(base.latency_p50 / cand.latency_p50)
        t0 = time.perf_counter()
        pair = device.benchmark(models["candidate"], workload, baseline=models["baseline"])
        t_pair.append(time.perf_counter() - t0)
        paired.append(pair.speedup)

    results = {
        "workload": {"prompt_tokens": len(prompt), "answer_tokens": workload.answer_tokens, "threads": threads,
                     "repetitions": workload.repetitions},
        "candidate": f"{args.drop_layers} lowest Block-Influence layers removed",
        "rounds": args.rounds,
        "separate": stats(separate) | {"estimates": separate, "seconds_median": statistics.median(t_sep)},
        "paired": stats(paired) | {"estimates": paired, "seconds_median": statistics.median(t_pair)},
    }
    print(f"speed-up of the embedded model with {args.drop_layers} layers removed, {args.rounds} estimates each")
    print(f"{'method':<10} {'median':>7} {'min':>6} {'max':>6} {'CV':>6} {'s/estimate':>11}")
    for method in ("separate", "paired"):
        r = results[method]
        print(f"{method:<10} {r['median']:7.3f} {r['min']:6.3f} {r['max']:6.3f} {r['cv']:6.1%} "
              f"{r['seconds_median']:11.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
