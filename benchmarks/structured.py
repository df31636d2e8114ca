"""Structured methods at the seed recipe's measured decode speed: which loses the least quality?

On the embedded default model (SmolLM2-135M-Instruct, 30 layers, 9 heads in 3 KV groups), Q4_K_M
with an importance matrix, the default profile's calibration text (self-generated, 16 windows of
128 tokens; quality on the 8 held-out windows), llama.cpp on this machine:

1. the seed recipe of the case study: a contiguous middle block of 25% of the layers (8 of 30:
   11-18) and one query head per KV group (9 -> 6, the least important by the search's width score);
2. each method's candidate at the seed's *measured* decode speed-up: the method's ratio is chosen
   with the latency model (fitted to the unpruned model and the seed, measured side by side),
   then the chosen candidate is timed alongside the unpruned model; when that misses the seed's
   speed-up by more than 5%, the prediction is re-aimed by the miss (twice at most), and a row
   that still misses says so;
3. combinations: attention sublayers plus layers, and a narrower quantization recipe plus layers;
4. with --build, `edgeprune build` itself with the seed's measured end-to-end speed-up as its SLO.

Prints a table (decode speed-up, latency, size, perplexity, KLD, top-1) and writes JSON.

    .venv/bin/python benchmarks/structured.py [--build] [--out benchmarks/results/structured.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeprune.analysis.scores import select_heads
from edgeprune.config import load_profile, load_target
from edgeprune.devices import get_device
from edgeprune.evaluate import Quality
from edgeprune.latency import LatencyModel, ModelTraffic, Observation, host_profile
from edgeprune.measure import Workload
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import (
    CandidateModel,
    CandidateQuality,
    calibration_splits,
    importance_of,
    reference_logprobs,
)
from edgeprune.prune import ModelShape, Plan
from edgeprune.quantize import QuantSpec
from edgeprune.runtimes.registry import get_runtime
from edgeprune.stages import StageRunner
from edgeprune.structured import STRUCTURED_METHODS, StructuredSettings, structured_importance

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TOLERANCE = 0.05  # matched: measured decode speed-up within 5% of the seed's
MAX_BUILDS = 4  # per matching
CORRECTIONS = 2  # re-aims after a measurement misses the seed's speed-up


@dataclass
class Built:
    plan: Plan
    gguf: Path
    size_bytes: int
    quality: Quality
    traffic: ModelTraffic


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runner = StageRunner(args.cache_dir / "stages")
        self.reference = load_reference(resolve_source(None), args.cache_dir)
        self.shape = ModelShape.from_config(self.reference.config)
        profile = load_profile("default")
        self.splits = calibration_splits(self.reference, profile.calibration, None, self.runner)
        self.ref_logps, self.ref_ppl = reference_logprobs(self.reference, self.splits, self.runner)
        target = load_target("demo")
        self.device = get_runtime().runner(get_device("local"))
        prompt = tuple(self.splits.heldout.flatten().tolist()[: target.slo.prompt_tokens])
        self.workload = Workload(prompt, target.slo.answer_tokens, args.threads, 1, args.repetitions)
        self.quant = QuantSpec("Q4_K_M", "default", imatrix=True)
        self.host = host_profile(args.cache_dir, args.threads)
        self.baseline = self.build(Plan())
        self.model: LatencyModel | None = None

    def build(self, plan: Plan, recipe: str = "default") -> Built:
        quant = QuantSpec(self.quant.quant, recipe, self.quant.imatrix)
        stage = CandidateModel(self.reference, plan, quant, self.splits, self.args.threads)
        out = self.runner.run(stage)
        gguf = stage.file(out)
        q = self.runner.run(CandidateQuality(gguf, out.key, self.splits, self.ref_logps, self.args.threads))
        return Built(plan, gguf, out.result["size_bytes"], Quality(**q.result), ModelTraffic.from_gguf(gguf))

    def measure(self, built: Built) -> dict[str, Any]:
        """Timed alternating with the unpruned model: medians of per-pair ratios."""
        record = self.device.benchmark(built.gguf, self.workload, self.baseline.gguf)
        pairs = list(zip(record.runs, record.baseline_runs, strict=True))
        return {
            "decode_speedup": statistics.median(r["decode_tok_s"] / b["decode_tok_s"] for r, b in pairs),
            "latency_speedup": statistics.median(b["latency_s"] / r["latency_s"] for r, b in pairs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r, _ in pairs),
            "latency_p50_s": statistics.median(r["latency_s"] for r, _ in pairs),
            "record": record,
        }

    def predicted_speedup(self, built: Built) -> float:
        n, m = len(self.workload.prompt), self.workload.answer_tokens
        return (self.model.predict(built.traffic, n, m).decode_tok_s
                / self.model.predict(self.baseline.traffic, n, m).decode_tok_s)

    def match(self, make: Callable[[float], tuple[Plan, str]], x0: float, lo: float, hi: float, integer: bool,
              goal: float, tried: list[tuple[float, float, Built]]) -> tuple[Built, float]:
        """The ratio whose predicted decode speed-up is the goal: time per token is close to linear
        in what a ratio removes, so secant steps on 1/speed-up converge in two or three builds.
        `tried`: (ratio, predicted speed-up, built) of earlier calls, extended in place."""

        def at(x: float) -> tuple[float, Built]:
            x = min(max(round(x) if integer else round(x, 3), lo), hi)
            for done in tried:
                if done[0] == x:
                    return x, done[2]
            plan, recipe = make(x)
            built = self.build(plan, recipe)
            tried.append((x, self.predicted_speedup(built), built))
            logging.info("  x=%s: predicted %.3fx, KLD %.3f", x, tried[-1][1], built.quality.mean_kld)
            return x, built

        if not tried:
            at(x0)
        for _ in range(MAX_BUILDS - 1):
            best = min(tried, key=lambda t: abs(t[1] - goal))
            if abs(best[1] - goal) / goal < TOLERANCE / 3:
                break
            pts = sorted(tried, key=lambda t: abs(t[1] - goal))[:2]
            if len(pts) == 1:  # through the unpruned point (x=0: 1/speed-up 1)
                (xa, sa, _), (xb, sb) = pts[0], (0.0, 1.0)
            else:
                (xa, sa, _), (xb, sb, _) = pts
            if sa == sb:
                break
            x_new = xa + (1 / goal - 1 / sa) * (xb - xa) / (1 / sb - 1 / sa)
            x_new = min(max(x_new, lo), hi)
            if any((round(x_new) if integer else round(x_new, 3)) == t[0] for t in tried):
                break
            at(x_new)
        x, _, built = min(tried, key=lambda t: abs(t[1] - goal))
        return built, x


def removal(bench: Bench, method: str, k: float, granularity: str = "layer") -> Plan:
    """The plan of a depth method removing k layers (or sublayers); k = 0 removes nothing."""
    if k < 1:
        return Plan()
    # The ratio that removed_count() turns back into exactly k.
    return plan_of(bench, StructuredSettings(method=method, granularity=granularity,
                                             layer_ratio=(k - 0.25) / bench.shape.n_layers))


def depth(method: str, granularity: str = "layer") -> Callable[[Bench], Callable[[float], tuple[Plan, str]]]:
    def factory(bench: Bench):
        def make(k: float) -> tuple[Plan, str]:
            return removal(bench, method, k, granularity), "default"

        return make

    return factory


def width(method: str, allocation: str = "global") -> Callable[[Bench], Callable[[float], tuple[Plan, str]]]:
    def factory(bench: Bench):
        def make(r: float) -> tuple[Plan, str]:
            settings = StructuredSettings(method=method, head_ratio=r, ffn_ratio=r, allocation=allocation)
            return plan_of(bench, settings), "default"

        return make

    return factory


def attention_then_depth(attention: int, method: str = "loss-increase"):
    """Attention removed in the `attention` cheapest layers, then whole layers of the rest."""

    def factory(bench: Bench):
        attn = removal(bench, method, attention, "attention")

        def make(k: float) -> tuple[Plan, str]:
            layers = removal(bench, method, k)
            kept_attn = tuple(e for e in attn.heads if e[0] not in layers.drop_layers)
            return Plan(drop_layers=layers.drop_layers, heads=kept_attn), "default"

        return make

    return factory


def recipe_then_depth(recipe: str, method: str = "loss-increase"):
    def factory(bench: Bench):
        def make(k: float) -> tuple[Plan, str]:
            return removal(bench, method, k), recipe

        return make

    return factory


def plan_of(bench: Bench, settings: StructuredSettings) -> Plan:
    method = STRUCTURED_METHODS[settings.method]
    scores = structured_importance(bench.reference, bench.splits, *method.analyses(settings, bench.shape),
                                   bench.runner)
    return method.plan(settings, bench.shape, scores)


# (row label, plan factory, first ratio, low, high, integer)
ROWS: list[tuple[str, Any, float, float, float, bool]] = [
    ("layers: block-influence", depth("block-influence"), 8, 1, 20, True),
    ("layers: angular-distance", depth("angular-distance"), 8, 1, 20, True),
    ("layers: loss-increase", depth("loss-increase"), 8, 1, 20, True),
    ("attention sublayers: block-influence", depth("block-influence", "attention"), 20, 1, 28, True),
    ("attention sublayers: loss-increase", depth("loss-increase", "attention"), 20, 1, 28, True),
    ("MLP sublayers: loss-increase", depth("loss-increase", "mlp"), 10, 1, 28, True),
    ("width: magnitude-sp", width("magnitude-sp"), 0.3, 0.05, 0.8, False),
    ("width: wanda-sp", width("wanda-sp"), 0.3, 0.05, 0.8, False),
    ("width: wanda-sp, uniform", width("wanda-sp", "uniform"), 0.3, 0.05, 0.8, False),
    ("width: taylor1", width("taylor1"), 0.3, 0.05, 0.8, False),
    ("width: taylor2", width("taylor2"), 0.3, 0.05, 0.8, False),
    ("width: flap", width("flap"), 0.3, 0.05, 0.8, False),
    ("attention x8 + layers: loss-increase", attention_then_depth(8), 5, 1, 20, True),
    ("attention x16 + layers: loss-increase", attention_then_depth(16), 3, 0, 20, True),
    ("iq4_nl-narrow + layers: loss-increase", recipe_then_depth("iq4_nl-narrow"), 5, 0, 20, True),
    ("iq4_nl-narrow-keep-v + layers: loss-increase", recipe_then_depth("iq4_nl-narrow-keep-v"), 2, 0, 20, True),
    ("iq4_nl-narrow-keep-v + layers: block-influence",
     recipe_then_depth("iq4_nl-narrow-keep-v", "block-influence"), 2, 0, 20, True),
]


def seed_plan(bench: Bench) -> Plan:
    n, shape = bench.shape.n_layers, bench.shape
    k = int(0.25 * n + 0.5)
    start = (n - k) // 2
    drop = tuple(range(start, start + k))
    # The seed chooses its heads by the search's width score (Wanda-sp by default).
    importance = importance_of(bench.reference, bench.splits, load_profile("default").search, bench.runner)
    heads = tuple((l, select_heads(torch.tensor(importance.head_scores[l]), shape.n_head_kv, shape.n_head_kv,
                                   shape.group_size - 1)) for l in range(n) if l not in drop)
    return Plan(drop_layers=drop, heads=heads)


def row(label: str, built: Built, measured: dict[str, Any], bench: Bench, **extra: Any) -> dict[str, Any]:
    q = built.quality
    return {"label": label, "plan": built.plan.describe(bench.shape), "size_mib": built.size_bytes / MIB,
            "decode_speedup": measured["decode_speedup"], "latency_speedup": measured["latency_speedup"],
            "decode_tok_s": measured["decode_tok_s"], "latency_p50_s": measured["latency_p50_s"],
            "perplexity": q.perplexity, "mean_kld": q.mean_kld, "top1_agreement": q.top1_agreement, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--only", default=None, help="run the rows whose label contains this text")
    parser.add_argument("--build", action="store_true", help="also run `edgeprune build` at the seed's speed-up")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "structured.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    bench = Bench(args)

    seed = bench.build(seed_plan(bench))
    seed_m = bench.measure(seed)
    base_m = bench.measure(bench.baseline)  # the unpruned model against itself: the noise floor
    obs = [Observation.from_record(b.traffic, bench.workload, m["record"]) for b, m in ((seed, seed_m),
                                                                                        (bench.baseline, base_m))]
    bench.model = LatencyModel.for_host(bench.host).fitted(obs)
    goal = seed_m["decode_speedup"]
    logging.info("seed recipe: decode %.3fx, KLD %.3f", goal, seed.quality.mean_kld)
    rows = [row("unpruned Q4_K_M", bench.baseline, base_m, bench),
            row("seed recipe: middle 25% of layers + 1 head per KV group", seed, seed_m, bench)]

    for label, factory, x0, lo, hi, integer in ROWS:
        if args.only and args.only not in label:
            continue
        logging.info("%s", label)
        tried: list[tuple[float, float, Built]] = []
        make, aim = factory(bench), goal
        for attempt in range(1 + CORRECTIONS):
            built, x = bench.match(make, x0, lo, hi, integer, aim, tried)
            measured = bench.measure(built)
            miss = abs(measured["decode_speedup"] - goal) / goal > TOLERANCE
            if not miss or attempt == CORRECTIONS:
                break
            # The model is off for this kind of candidate: aim the prediction where measurement lands.
            aim = goal * bench.predicted_speedup(built) / measured["decode_speedup"]
            logging.info("  measured %.3fx: aiming the prediction at %.3fx", measured["decode_speedup"], aim)
        trace = [{"x": t[0], "predicted_speedup": t[1], "mean_kld": t[2].quality.mean_kld} for t in tried]
        rows.append(row(label, built, measured, bench, ratio=x, tried=trace, matched=not miss))
        logging.info("  -> %s: measured %.3fx (%s), KLD %.3f", built.plan.describe(bench.shape),
                     measured["decode_speedup"], "matched" if not miss else "NOT matched", built.quality.mean_kld)

    build_row = None
    if args.build:
        build_row = run_build(bench, seed_m["latency_speedup"], args)
    result = {"seed_decode_speedup": goal, "seed_latency_speedup": seed_m["latency_speedup"],
              "reference_perplexity": bench.ref_ppl, "workload": bench.workload.to_dict() | {"prompt": None},
              "host": bench.host.describe(), "rows": rows, "build": build_row,
              "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)


def run_build(bench: Bench, speedup: float, args: argparse.Namespace) -> dict[str, Any]:
    """`edgeprune build --target demo --speedup <seed's>`: the selected candidate, as a row."""
    from edgeprune.build import BuildConfig, build

    target = load_target("demo").with_budget(latency_budget_s=None, speedup=round(speedup, 2))
    out = args.out.parent / "structured-build"
    config = BuildConfig(target=target, profile=load_profile("default"), output_dir=out, cache_dir=args.cache_dir,
                         force=True)
    result = build(config)
    sel = next((c for c in result.report["search"]["candidates"] if c["selected"]), None)
    return {"slo_speedup": round(speedup, 2), "selected": sel and {k: sel[k] for k in (
        "id", "step", "size_bytes", "speedup", "latency_p50_s", "decode_tok_s", "perplexity", "mean_kld",
        "top1_agreement")}, "candidates": len(result.report["search"]["candidates"]),
        "stop_reason": result.report["search"]["stop_reason"]}


def print_table(result: dict[str, Any]) -> None:
    print(f"\nSeed recipe: decode {result['seed_decode_speedup']:.2f}x, end to end "
          f"{result['seed_latency_speedup']:.2f}x (timed alongside the unpruned model); reference perplexity "
          f"{result['reference_perplexity']:.2f}")
    print("| plan | what it removes | decode speed-up | latency p50 s | MiB | PPL | mean KLD | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        flag = "" if r.get("matched", True) else " (not matched)"
        print(f"| {r['label']} | {r['plan']} | {r['decode_speedup']:.2f}x{flag} | {r['latency_p50_s']:.3f} | "
              f"{r['size_mib']:.1f} | {r['perplexity']:.2f} | {r['mean_kld']:.3f} | {r['top1_agreement'] * 100:.1f}% |")
    b = result["build"]
    if b and b["selected"]:
        s = b["selected"]
        print(f"\nedgeprune build --speedup {b['slo_speedup']}: {s['step']}: {s['speedup']:.2f}x end to end, "
              f"KLD {s['mean_kld']:.3f} ({b['candidates']} candidates; {b['stop_reason']})")
    elif b:
        print(f"\nedgeprune build --speedup {b['slo_speedup']}: no candidate met it ({b['stop_reason']})")


if __name__ == "__main__":
    main()
