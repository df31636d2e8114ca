"""The latency model against llama.cpp on the embedded model's candidates: predicted vs measured.

Candidates: the embedded SmolLM2-135M in several quantization types, with a per-tensor recipe, and
pruned (layers removed, narrower FFNs, attention removed in some layers: arch `deci`), all built
by the pipeline's CandidateModel stage (cached; no importance matrix: it changes quality, not
speed). Each candidate is timed with the unpruned Q4_K_M alongside it, runs alternated in one
runner process, as `edgeprune build` times them. Then, per candidate, predicted vs measured decode
tok/s, TTFT and end-to-end latency:

- "fit on unpruned": the model fitted on the unpruned Q4_K_M's runs timed alongside that
  candidate (one measurement: efficiencies only), as the search would have it;
- "leave-one-out": fitted on every other candidate's own measurement, two ways: least squares
  with a fixed cost per eval (`fixed_costs=True`) and efficiency only (median ratio);
- "defaults": no measurement at all.

Also the physical limit: decode tok/s as a share of the host's bandwidth roofline, and the
unpruned model's transferred estimate for the arm16g target.

    .venv/bin/python benchmarks/latency.py [--threads 1] [--out benchmarks/results/latency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from edgeprune.config import load_target
from edgeprune.devices import get_device
from edgeprune.latency import LatencyModel, ModelTraffic, Observation, host_profile, roofline_fraction
from edgeprune.measure import Workload, summarize
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import CandidateModel
from edgeprune.prune import Plan
from edgeprune.quantize import QuantSpec
from edgeprune.runtimes import llamacpp
from edgeprune.runtimes.registry import get_runtime
from edgeprune.stages import StageRunner

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
BASELINE = "Q4_K_M"
N_LAYERS = 30
PROSE = ("The control room of the bottling plant logs every valve, pump and conveyor once a second. When a pressure "
         "reading drifts outside its band, the operator asks the assistant what changed in the last hour. ")
# label -> (plan, quantization type, recipe)
CANDIDATES: dict[str, tuple[Plan, str, str]] = {
    BASELINE: (Plan(), "Q4_K_M", "default"),
    "Q8_0": (Plan(), "Q8_0", "default"),
    "Q6_K": (Plan(), "Q6_K", "default"),
    "Q5_K_M": (Plan(), "Q5_K_M", "default"),
    "Q4_K_S": (Plan(), "Q4_K_S", "default"),
    "Q3_K_M": (Plan(), "Q3_K_M", "default"),
    "Q4_K_M iq4_nl-narrow": (Plan(), "Q4_K_M", "iq4_nl-narrow"),
    "Q4_K_M -4 layers": (Plan(drop_layers=tuple(range(22, 26))), "Q4_K_M", "default"),
    "Q4_K_M -8 layers": (Plan(drop_layers=tuple(range(18, 26))), "Q4_K_M", "default"),
    "Q4_K_M -12 layers": (Plan(drop_layers=tuple(range(14, 26))), "Q4_K_M", "default"),
    "Q4_K_M FFN 1024": (Plan(ffn=tuple((l, tuple(range(1024))) for l in range(N_LAYERS))), "Q4_K_M", "default"),
    "Q4_K_M deci: 8 attn, 2 MLP removed": (
        Plan(heads=tuple((l, ()) for l in range(10, 18)), ffn=((20, ()), (21, ()))), "Q4_K_M", "default"),
}


def rel(predicted: float, measured: float) -> float:
    return predicted / measured - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency.json")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "tests")
    # One thread by default: on a shared 2-core machine, two llama.cpp threads stall at every barrier
    # whenever another job holds a core (measured: 3 ms/token becomes 10-460 ms/token).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=100)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()

    runner = StageRunner(args.cache_dir / "stages")
    reference = load_reference(resolve_source(None), args.cache_dir)
    files = {}
    for label, (plan, qtype, recipe) in CANDIDATES.items():
        stage = CandidateModel(reference, plan, QuantSpec(qtype, recipe, imatrix=False), None, 2)
        files[label] = stage.file(runner.run(stage))
    del reference

    t0 = time.perf_counter()
    host = host_profile(args.cache_dir, args.threads)
    print(f"host: {host.describe()} (profile: {time.perf_counter() - t0:.1f} s, cached after the first run)")
    tokens = llamacpp.tokenize(files[BASELINE], PROSE)
    prompt = tuple((tokens * (args.prompt_tokens // len(tokens) + 1))[: args.prompt_tokens])
    p, a = len(prompt), args.answer_tokens
    workload = Workload(prompt, a, args.threads, warmup=1, repetitions=args.repetitions)
    device = get_runtime().runner(get_device("local"))
    base = LatencyModel.for_host(host)
    traffic = {label: ModelTraffic.from_gguf(path) for label, path in files.items()}

    rows, own = [], {}
    for label, path in files.items():
        alongside = None if label == BASELINE else files[BASELINE]
        record = device.benchmark(path, workload, alongside)
        own[label] = Observation(traffic[label], p, a, dict(record.summary))
        reference_runs = record.baseline_runs if alongside else record.runs
        fit = base.fitted([Observation(traffic[BASELINE], p, a, summarize(reference_runs))])
        rows.append({"candidate": label, "traffic": traffic[label].to_dict(), "measured": own[label].summary,
                     "fit_on_unpruned": fit.predict(traffic[label], p, a).to_dict(),
                     "defaults": base.predict(traffic[label], p, a).to_dict(),
                     "roofline_fraction": roofline_fraction(own[label].summary["decode_tok_s_p50"], traffic[label],
                                                            host.bandwidth_gbs, context=p + a // 2)})
        print(f"{label} measured", flush=True)

    for row in rows:
        others = [o for k, o in own.items() if k != row["candidate"]]
        t = traffic[row["candidate"]]
        row["loo_fixed_cost"] = base.fitted(others, fixed_costs=True).predict(t, p, a).to_dict()
        row["loo_efficiency_only"] = base.fitted(others, fixed_costs=False).predict(t, p, a).to_dict()
        for key in ("fit_on_unpruned", "defaults", "loo_fixed_cost", "loo_efficiency_only"):
            pred = row[key]
            row[key]["error"] = {"decode": rel(pred["decode_tok_s"], row["measured"]["decode_tok_s_p50"]),
                                 "ttft": rel(pred["ttft_s"], row["measured"]["ttft_p50_s"]),
                                 "latency": rel(pred["latency_s"], row["measured"]["latency_p50_s"])}

    full = base.fitted(list(own.values()))
    arm = load_target("arm16g")
    estimate = base.fitted([own[BASELINE]]).transfer(arm.hardware, name="arm16g").predict(
        traffic[BASELINE], arm.slo.prompt_tokens, arm.slo.answer_tokens)
    summary = summarize_errors(rows)
    print_report(rows, summary, workload, host, full, estimate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "host": asdict(host), "workload": workload.to_dict() | {"prompt": p},
        "calibration_all": asdict(full.calibration), "arm16g_estimate_unpruned": estimate.to_dict(),
        "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def summarize_errors(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key in ("fit_on_unpruned", "loo_fixed_cost", "loo_efficiency_only", "defaults"):
        for scope, subset in (("all", rows), ("same types", [r for r in rows if _same_types(r["candidate"])])):
            out.setdefault(key, {})[scope] = {
                f"{m}_{stat}": fn(abs(r[key]["error"][m]) for r in subset if r["candidate"] != BASELINE
                                  or not key.startswith("fit"))
                for m in ("decode", "ttft", "latency") for stat, fn in (("median", statistics.median), ("max", max))}
    return out


def _same_types(label: str) -> bool:
    """Candidates with the baseline's type mix: Q4_K_M with llama.cpp's own fallbacks, pruned or not."""
    return label.startswith("Q4_K_M") and "iq4_nl" not in label


def print_report(rows, summary, workload, host, full, estimate) -> None:
    print(f"\nembedded SmolLM2-135M candidates; {len(workload.prompt)}-token prompt + {workload.answer_tokens}-token "
          f"answer, {workload.threads} thread(s), median of {workload.repetitions} runs, each timed alongside the "
          f"unpruned {BASELINE}\nhost: {host.describe()}\n")
    w = max(len(r["candidate"]) for r in rows)
    print(f"{'candidate':<{w}} {'MiB/tok':>7} {'GF/tok':>6} | {'decode tok/s':^22} | {'TTFT ms':^21} | "
          f"{'latency s':^21} | {'LOO decode':^10} | roofline")
    print(f"{'':<{w}} {'':>7} {'':>6} | {'meas':>6} {'pred':>6} {'err':>8} | {'meas':>6} {'pred':>6} {'err':>7} | "
          f"{'meas':>6} {'pred':>6} {'err':>7} | {'err':>10} |")
    for r in rows:
        m, f, t = r["measured"], r["fit_on_unpruned"], r["traffic"]
        e = f["error"]
        print(f"{r['candidate']:<{w}} {t['weight_bytes_per_token'] / MIB:7.1f} {t['flops_per_token'] / 1e9:6.3f} | "
              f"{m['decode_tok_s_p50']:6.1f} {f['decode_tok_s']:6.1f} {e['decode']:+8.1%} | "
              f"{m['ttft_p50_s'] * 1e3:6.1f} {f['ttft_s'] * 1e3:6.1f} {e['ttft']:+7.1%} | "
              f"{m['latency_p50_s']:6.3f} {f['latency_s']:6.3f} {e['latency']:+7.1%} | "
              f"{r['loo_efficiency_only']['error']['decode']:+10.1%} | {r['roofline_fraction']:.2f}")
    print("\n|relative error|, median / max over candidates (fit on unpruned: the unpruned model itself excluded)")
    for key, scopes in summary.items():
        for scope, s in scopes.items():
            print(f"  {key:<20} {scope:<10}  decode {s['decode_median']:6.1%} / {s['decode_max']:6.1%}   "
                  f"TTFT {s['ttft_median']:6.1%} / {s['ttft_max']:6.1%}   "
                  f"latency {s['latency_median']:6.1%} / {s['latency_max']:6.1%}")
    c = full.calibration
    print(f"\nfitted on all {c.observations}: decode efficiency {c.decode_efficiency:.2f} + "
          f"{c.decode_overhead_s * 1e3:.2f} ms/token, prefill efficiency {c.prefill_efficiency:.2f} + "
          f"{c.prefill_overhead_s * 1e3:.1f} ms")
    print(f"unpruned {BASELINE}, {estimate.describe()}")


if __name__ == "__main__":
    main()
