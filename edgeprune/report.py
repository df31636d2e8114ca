"""report.json (every candidate, the selection, the verdict) and its human renderings: report.md, and
report.html (report_html.py) with the plots."""

from __future__ import annotations

from typing import Any

from edgeprune.chat_health import summary
from edgeprune.latency import Prediction
from edgeprune.search import Candidate, SearchOutcome

MIB = 1 << 20


def candidate_to_dict(c: Candidate, selected: Candidate | None, estimate: Prediction | None = None) -> dict[str, Any]:
    """One candidate's row: measured figures (None where it was not timed), its prediction on the
    device when the search made one, and the target estimate when measured on a stand-in."""
    s = c.bench.summary if c.measured else {}
    return {
        "id": c.id,
        "step": c.state.describe(),
        "runtime": c.state.runtime,
        "plan": c.plan.to_dict(),
        "size_bytes": c.size_bytes,
        "parameters": c.parameters,
        "measured": c.measured,
        "latency_p50_s": s.get("latency_p50_s"),
        "latency_p90_s": s.get("latency_p90_s"),
        "latency_spread": s.get("latency_spread"),
        "speedup": c.bench.speedup if c.measured else None,
        "ttft_p50_s": s.get("ttft_p50_s"),
        "prefill_tok_s": s.get("prefill_tok_s_p50"),
        "decode_tok_s": s.get("decode_tok_s_p50"),
        "peak_rss_bytes": c.bench.peak_rss_bytes if c.measured else None,
        "device": c.bench.device if c.measured else None,  # which device of a fleet timed it
        "built_on": c.built_on,  # which node of a Ray cluster built it (None: the build's own machine)
        "recovered_from": c.recovered_from,  # a recovered copy of this candidate (timed as it)
        "recovery": c.recovery,
        **c.quality.to_dict(),
        "verdict": c.verdict,
        "confirmed": c.confirmed,
        "selected": c is selected,
        "predicted_on_device": c.prediction.to_dict() if c.prediction else None,
        "predicted_speedup": c.predicted_speedup,
        "predicted_kld": c.predicted_kld,
        "estimate_on_target": estimate.to_dict() if estimate else None,
        "benchmark": c.bench.to_dict() if c.measured else None,
    }


def outcome_to_dict(outcome: SearchOutcome, estimates: dict[str, Prediction] | None = None) -> dict[str, Any]:
    selected, estimates = outcome.selected, estimates or {}
    return {
        "budget": outcome.budget.to_dict(),
        "stop_reason": outcome.stop_reason,
        "candidates": [candidate_to_dict(c, selected, estimates.get(c.id)) for c in outcome.candidates],
        "selected": selected.id if selected else None,
        "closest": outcome.closest.id,
        "budget_met": selected is not None,
        "not_built": outcome.skipped,
        "strategy": outcome.strategy,
        "reachable_speedup": outcome.reachable,  # without a pick: the best predicted within the limits
        "strategy_details": outcome.details,
    }


def fleet_of(device: dict[str, Any]) -> dict[str, Any]:
    """The devices that timed candidates (a report written before fleets names one)."""
    return device.get("fleet", {"urls": [device["url"]], "dropped": {}})


def _figure(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "not timed" if value is None else format(value * scale, fmt)


def _row(c: dict[str, Any], estimates: bool) -> str:
    mark = "**" if c["selected"] else ""
    est = c.get("estimate_on_target")
    cells = [
        f"{mark}{c['id']}{mark}", c["step"], f"{c['size_bytes'] / MIB:.1f}", _figure(c["latency_p50_s"], ".3f"),
        _figure(c["latency_p90_s"], ".3f"), _figure(c["speedup"], ".2f") + ("x" if c["speedup"] else ""),
        _figure(c["decode_tok_s"], ".0f"), _figure(c["ttft_p50_s"], ".0f", 1000),
        _figure(c["peak_rss_bytes"], ".0f", 1 / MIB),
    ]
    if estimates:
        cells.append(f"{est['latency_s']:.3f}" if est else "")
    cells += [f"{c['perplexity']:.2f}", f"{c['mean_kld']:.3f}", f"{c['top1_agreement'] * 100:.1f}%", c["verdict"]]
    return "| " + " | ".join(cells) + " |"


def render_markdown(report: dict[str, Any]) -> str:
    search, target, device = report["search"], report["target"], report["device"]
    estimates = any(c.get("estimate_on_target") for c in search["candidates"])
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
    reachable = search.get("reachable_speedup")
    lines += ["", f"Budget: {search['budget']['description']}. Search ({search.get('strategy', 'greedy')}) stopped: "
              f"{search['stop_reason']}."
              + (f" The best speed-up predicted within the search limits: {reachable:.2f}x." if reachable else ""), "",
              "## Where this was measured", ""]
    lines += [f"- {n}" for n in report["notes"]]
    fleet = fleet_of(device)
    if len(fleet["urls"]) > 1:
        lines.append(f"- Timed on a fleet of {len(fleet['urls'])} devices of the same hardware in parallel ("
                     + ", ".join(f"`{u}`" for u in fleet["urls"]) + "), each candidate alongside the unpruned model "
                     "on the device that timed it" + "".join(f"; `{u}` dropped out: {why}"
                                                            for u, why in fleet["dropped"].items()) + ".")
    lines += [
        f"- Device `{device['url']}` ({device['arch']}), {report['workload']['threads']} threads; workload "
        f"{report['workload']['prompt_tokens']}-token prompt + {report['workload']['answer_tokens']}-token answer, "
        f"{report['workload']['warmup']} warm-up + {report['workload']['repetitions']} timed runs per candidate.",
        *_runtime_lines(report),
        f"- Quality: each quantized candidate's logits in its own runtime vs the fp32 torch reference on "
        f"{report['calibration']['heldout_windows'][0]} held-out windows of "
        f"{report['calibration']['heldout_windows'][1]} tokens ({report['calibration']['source']}); "
        f"reference perplexity {report['calibration']['reference_perplexity']:.2f}.",
        "",
        "## Candidates",
        "",
        "| id | step | MiB | p50 s | p90 s | speed-up | decode tok/s | TTFT ms | peak RSS MiB | "
        + ("target s (est.) | " if estimates else "") + "PPL | KLD | top-1 | verdict |",
        "|---" * (14 if estimates else 13) + "|",
    ]
    lines += [_row(c, estimates) for c in search["candidates"]]
    lines += _recovery_lines(search.get("recovery"))
    lines += _prediction_notes(report, search, estimates)
    lines += _settings_lines(report.get("runtime_settings"))
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items())
    lines += ["", f"Time: {timings}.", ""]
    lines += _verifications(report.get("verifications", []))
    return "\n".join(lines)


def _recovery_lines(recovery: dict[str, Any] | None) -> list[str]:
    """Each recovered candidate's KLD before and after, and whether recovery changed the pick."""
    if not recovery:
        return []
    if not recovery["candidates"]:
        return ["", f"Recovery: none ({recovery['not_recovered']})."]
    lines = ["", "## Recovery", "", f"Policy: {recovery['policy']}.", "",
             "| recovered | from | KLD before | KLD after | share recovered | steps | minutes |", "|---" * 7 + "|"]
    lines += [f"| {r['id']} | {r['from']} | {r['before_kld']:.3f} | {r['after_kld']:.3f} | "
              f"{r['recovered_share'] * 100:.0f}% | {r['steps']} | {r['minutes']:.1f} |"
              for r in recovery["candidates"]]
    changed = recovery["selected"] != recovery["selected_before"]
    lines += ["", f"Pick: {recovery['selected']}" + (f" (was {recovery['selected_before']} before recovery)."
                                                     if changed else " (unchanged by recovery).")]
    if "chat" in recovery:
        chat = recovery["chat"]
        lines += ["", f"Chat answers of {chat['candidate']} (greedy, in the chat template): {summary(chat['after'])}; "
                  f"before recovery {summary(chat['before'])}.", "", "| question | before recovery | after |",
                  "|---|---|---|"]
        lines += [f"| {b['question']} | {_cell(b['answer'])} | {_cell(a['answer'])} |"
                  for b, a in zip(chat["before"], chat["after"], strict=True)]
    return lines


def _cell(text: str) -> str:
    """A text in one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _settings_lines(tuning: dict[str, Any] | None) -> list[str]:
    """The runtime settings the bundle runs with, and the timings that chose them."""
    if tuning is None:
        return []
    if "not_tuned" in tuning:
        return ["", f"Runtime settings: the runtime's defaults ({tuning['not_tuned']})."]
    def show(settings: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in settings.items())

    lines = ["", "## Runtime settings", "", f"Shipped: {show(tuning['chosen'])} (default: {show(tuning['default'])}); "
             f"{tuning['rule']}.", "", "| tried | against | speed-up | faster in | decode tok/s | TTFT ms | kept |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {t['setting']} {t['value']} | {show(t['against'])} | {t['speedup']:.2f}x | {t['wins']:.0%} | "
              f"{t['decode_tok_s']:.1f} (vs {t['against_decode_tok_s']:.1f}) | {1000 * t['ttft_s']:.0f} | "
              f"{'yes' if t['kept'] else 'no'} |" for t in tuning["trials"]]
    lines += [f"| {s['setting']} {s['value']} | not timed: {_cell(s['why'])} | | | | | |"
              for s in tuning.get("skipped", ())]
    check = tuning.get("lossy_check")
    if check:
        lines += ["", f"{show(check['settings'])} changes the output, not only its speed: the pick's held-out KLD "
                      f"with it is {check['kld']:.4f} (top-1 {check['top1']:.3f}) against "
                      f"{check['kld_as_searched']:.4f} as searched; {check['rule']}: "
                      f"{'shipped' if check['kept'] else 'not shipped'}."]
    return lines


def _runtime_lines(report: dict[str, Any]) -> list[str]:
    """Which runtimes the search realised candidates in, and why any other was left out."""
    runtimes = report.get("runtimes")
    if runtimes is None:
        return []
    searched = ", ".join(f"{r['name']} ({r['quant']}, {r['version']})" for r in runtimes["searched"])
    lines = [f"- Runtimes searched: {searched}; selection: {runtimes['selection']}."]
    lines += [f"- Not searched: {name}: {why}." for name, why in runtimes["not_searched"].items()]
    return lines


def _prediction_notes(report: dict[str, Any], search: dict[str, Any], estimates: bool) -> list[str]:
    """How the latency model took part: what it skipped, and what the target column means."""
    model = report.get("latency_model")
    if model is None:
        return []
    lines = [""]
    skipped = [c for c in search["candidates"] if not c["measured"]]
    if skipped or search["not_built"]:
        lines.append(f"The latency model (fitted to the {model['observations']} candidates timed on this device) "
                     f"skipped what it predicted to miss the budget by more than {model['skip_margin']:.0%}, "
                     "widened by the under-prediction measured on each kind of step the candidate has ("
                     + ", ".join(f"{k} {v:.2f}x" for k, v in model.get("under_prediction", {}).items())
                     + "; a kind with none measured is never skipped): "
                     f"{len(skipped)} built but not timed, {len(search['not_built'])} not built "
                     + "".join(f"({n['step']}: {n['reason']}) " for n in search["not_built"]).rstrip() + ".")
    if estimates:
        lines.append(f"*target s (est.)*: end-to-end latency on {report['target']['name']} estimated from this "
                     f"device's measurements by the roofline model, with the target's "
                     f"{report['target']['hardware']['memory_bandwidth_gbs']:g} GB/s: not a measurement "
                     "(benchmarks/latency.py states the model's error).")
    return lines


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


def render_reports(report: dict[str, Any]) -> dict[str, str]:
    """Every rendering of report.json, by file name: written by a build, rewritten by `verify`."""
    from edgeprune.report_html import render_html  # matplotlib: only when a report is written

    return {"report.md": render_markdown(report), "report.html": render_html(report)}
