"""report.json (every candidate, the selection, the verdict) and its human rendering, report.md."""

from __future__ import annotations

from typing import Any

from edgeprune.search import Candidate, SearchOutcome

MIB = 1 << 20


def candidate_to_dict(c: Candidate, selected: Candidate | None) -> dict[str, Any]:
    s = c.bench.summary
    return {
        "id": c.id,
        "step": c.state.describe(),
        "plan": c.plan.to_dict(),
        "size_bytes": c.size_bytes,
        "parameters": c.parameters,
        "latency_p50_s": s["latency_p50_s"],
        "latency_p90_s": s["latency_p90_s"],
        "latency_spread": s["latency_spread"],
        "speedup": c.bench.speedup,
        "ttft_p50_s": s["ttft_p50_s"],
        "prefill_tok_s": s["prefill_tok_s_p50"],
        "decode_tok_s": s["decode_tok_s_p50"],
        "peak_rss_bytes": c.bench.peak_rss_bytes,
        **c.quality.to_dict(),
        "verdict": c.verdict,
        "confirmed": c.confirmed,
        "selected": c is selected,
        "benchmark": c.bench.to_dict(),
    }


def outcome_to_dict(outcome: SearchOutcome) -> dict[str, Any]:
    selected = outcome.selected
    return {
        "budget": outcome.budget.to_dict(),
        "stop_reason": outcome.stop_reason,
        "candidates": [candidate_to_dict(c, selected) for c in outcome.candidates],
        "selected": selected.id if selected else None,
        "closest": outcome.closest.id,
        "budget_met": selected is not None,
    }


def _row(c: dict[str, Any]) -> str:
    mark = "**" if c["selected"] else ""
    return (
        f"| {mark}{c['id']}{mark} | {c['step']} | {c['size_bytes'] / MIB:.1f} | {c['latency_p50_s']:.3f} | "
        f"{c['latency_p90_s']:.3f} | {c['speedup']:.2f}x | {c['decode_tok_s']:.0f} | {c['ttft_p50_s'] * 1000:.0f} | "
        f"{c['peak_rss_bytes'] / MIB:.0f} | {c['perplexity']:.2f} | {c['mean_kld']:.3f} | "
        f"{c['top1_agreement'] * 100:.1f}% | {c['verdict']} |"
    )


def render_markdown(report: dict[str, Any]) -> str:
    search, target, device = report["search"], report["target"], report["device"]
    selected = next((c for c in search["candidates"] if c["selected"]), None)
    lines = [
        f"# edgeprune build: {report['model']['id']} for target `{target['name']}`",
        "",
        f"*{target['description']}*",
        "",
    ]
    if selected:
        lines += [
            f"**Budget met** by {selected['id']} ({selected['step']}): p90 {selected['latency_p90_s']:.3f} s "
            f"({selected['speedup']:.2f}x faster than the unpruned model timed alongside); "
            f"mean KLD {selected['mean_kld']:.3f}, top-1 agreement {selected['top1_agreement'] * 100:.1f}%.",
        ]
    else:
        closest = next(c for c in search["candidates"] if c["id"] == search["closest"])
        lines += [
            f"**Budget not met**: no candidate within the search limits met it; the closest was "
            f"{closest['id']} ({closest['step']}) at p90 {closest['latency_p90_s']:.3f} s, "
            f"{closest['speedup']:.2f}x faster than the unpruned model.",
        ]
    lines += ["", f"Budget: {search['budget']['description']}. Search stopped: {search['stop_reason']}.", "",
              "## Where this was measured", ""]
    lines += [f"- {n}" for n in report["notes"]]
    lines += [
        f"- Device `{device['url']}` ({device['arch']}), {report['workload']['threads']} threads; workload "
        f"{report['workload']['prompt_tokens']}-token prompt + {report['workload']['answer_tokens']}-token answer, "
        f"{report['workload']['warmup']} warm-up + {report['workload']['repetitions']} timed runs per candidate.",
        f"- Quality: llama.cpp logits of each quantized candidate vs the fp32 torch reference on "
        f"{report['calibration']['heldout_windows'][0]} held-out windows of "
        f"{report['calibration']['heldout_windows'][1]} tokens ({report['calibration']['source']}); "
        f"reference perplexity {report['calibration']['reference_perplexity']:.2f}.",
        "",
        "## Candidates",
        "",
        "| id | step | MiB | p50 s | p90 s | speed-up | decode tok/s | TTFT ms | peak RSS MiB | PPL | KLD "
        "| top-1 | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(c) for c in search["candidates"]]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items())
    lines += ["", f"Time: {timings}.", ""]
    lines += _verifications(report.get("verifications", []))
    return "\n".join(lines)


def _verifications(verifications: list[dict[str, Any]]) -> list[str]:
    """`edgeprune verify` runs on the target's hardware, as written back into the report."""
    if not verifications:
        return []
    lines = ["## Verified on the device", "",
             "| when | device | CPU | threads | p50 s | p90 s | TTFT ms | decode tok/s | peak RSS MiB | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in verifications:
        s = v["summary"]
        lines.append(
            f"| {v['measured']} | {v['device']} | {v['cpu']} | {v['threads']} | {s['latency_p50_s']:.3f} "
            f"| {s['latency_p90_s']:.3f} | {s['ttft_p50_s'] * 1000:.0f} | {s['decode_tok_s_p50']:.1f} "
            f"| {v['peak_rss_bytes'] / 2**20:.0f} | {'PASS' if v['verdict'] == 'meets' else 'FAIL: ' + v['verdict']} |")
    lines += ["", f"Budget judged on the device: {verifications[-1]['budget']['description']}"
              + (" (the speed-up criterion needs the unpruned model timed alongside: judged by `build` only)."
                 if verifications[-1]["speedup_not_judged"] else "."), ""]
    return lines
