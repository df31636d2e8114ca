"""report.html: the build report for a person. Self-contained and offline: matplotlib draws the plots
as SVG inlined into the page (no script, no CDN, no external file), styles are inline too.

Rendered from report.json alone, so `verify` can re-render it after writing its measurements back.
Each candidate's point is an SVG group with the id `candidate-<id>`; the budget line is `budget-line`,
the Pareto front `pareto-front`, the pick `selected`: what the tests (and a curious user) look for.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before any backend is touched: never a display
from matplotlib.figure import Figure  # noqa: E402

from edgeprune.report import fleet_of  # noqa: E402

MIB = 1 << 20
# Fixed ids and no date: the same report renders to the same bytes.
SVG_STYLE = {"svg.hashsalt": "edgeprune", "svg.fonttype": "none", "font.size": 9}
TIMED, PREDICTED, PICK, FRONT, BUDGET = "#1f77b4", "#999999", "#d62728", "#2ca02c", "#ff7f0e"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr.selected td { background: #fde8e8; font-weight: 600; } tr.untimed td { color: #777; }
.verdict-met { color: #1a7f37; font-weight: 600; } .verdict-not-met { color: #b3261e; font-weight: 600; }
.estimated { font-style: italic; color: #8a5a00; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; max-width: 900px; }
"""


@dataclass(frozen=True)
class Axis:
    """What the x axis of the trade-off plot measures: the speed-up if the budget asks for one,
    else the p90 latency in seconds."""
    label: str
    budget: float | None
    faster_is_larger: bool

    @classmethod
    def for_budget(cls, budget: dict[str, Any]) -> Axis:
        if budget.get("speedup") is not None or budget.get("latency_s") is None:
            return cls("speed-up over the unpruned model (x)", budget.get("speedup"), True)
        return cls("p90 latency (s)", budget["latency_s"], False)

    def measured(self, c: dict[str, Any]) -> float | None:
        return c["speedup"] if self.faster_is_larger else c["latency_p90_s"]

    def predicted(self, c: dict[str, Any]) -> float | None:
        if self.faster_is_larger:
            return c.get("predicted_speedup")
        prediction = c.get("predicted_on_device")
        return prediction["latency_s"] if prediction else None


def pareto_front(points: list[tuple[float, float, str]], faster_is_larger: bool) -> list[tuple[float, float, str]]:
    """The measured candidates no other beats on both speed and KLD, fastest first."""
    ordered = sorted(points, key=lambda p: (-p[0] if faster_is_larger else p[0], p[1]))
    front: list[tuple[float, float, str]] = []
    for p in ordered:
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return front


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": "edgeprune"})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the page is HTML


def tradeoff_plot(candidates: list[dict[str, Any]], axis: Axis) -> str:
    """Every candidate on (speed, KLD): timed ones filled, untimed ones hollow at their predicted
    speed; the budget line, the Pareto front of the timed ones, the pick."""
    fig = Figure(figsize=(8, 4.6))
    ax = fig.add_subplot()
    timed = []
    for c in candidates:
        x = axis.measured(c) if c["measured"] else axis.predicted(c)
        if x is None:
            continue
        style = {"marker": "o", "markersize": 7, "linestyle": "none"}
        if c["measured"]:
            style |= {"color": PICK if c["selected"] else TIMED}
            timed.append((x, c["mean_kld"], c["id"]))
        else:
            style |= {"markerfacecolor": "none", "markeredgecolor": PREDICTED}
        (point,) = ax.plot([x], [c["mean_kld"]], **style)
        point.set_gid(f"candidate-{c['id']}")
        ax.annotate(c["id"], (x, c["mean_kld"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if c["selected"]:
            (star,) = ax.plot([x], [c["mean_kld"]], marker="*", markersize=16, color=PICK, linestyle="none",
                              label=f"pick: {c['id']}")
            star.set_gid("selected")
    front = pareto_front(timed, axis.faster_is_larger)
    if len(front) > 1:
        (line,) = ax.plot([p[0] for p in front], [p[1] for p in front], color=FRONT, drawstyle="steps-post",
                          label="Pareto front (timed)")
        line.set_gid("pareto-front")
    if axis.budget is not None:
        line = ax.axvline(axis.budget, color=BUDGET, linestyle="--", label=f"budget {axis.budget:g}")
        line.set_gid("budget-line")
    ax.plot([], [], marker="o", color=TIMED, linestyle="none", label="timed on the device")
    ax.plot([], [], marker="o", markerfacecolor="none", markeredgecolor=PREDICTED, linestyle="none",
            label="not timed: at its predicted speed")
    klds = [c["mean_kld"] for c in candidates]
    if klds and min(klds) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(axis.label + ("" if axis.faster_is_larger else ": lower is faster"))
    ax.set_ylabel("mean KLD to the reference (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _svg(fig)


def trajectory_plot(candidates: list[dict[str, Any]], axis: Axis) -> str:
    """The search in the order it built: speed (measured or predicted) above, KLD below."""
    fig = Figure(figsize=(8, 4.2))
    speed, quality = fig.subplots(2, 1, sharex=True)
    order = range(len(candidates))
    for i, c in zip(order, candidates, strict=True):
        x = axis.measured(c) if c["measured"] else axis.predicted(c)
        face = (PICK if c["selected"] else TIMED) if c["measured"] else "none"
        style = {"marker": "o", "linestyle": "none", "markerfacecolor": face,
                 "markeredgecolor": face if c["measured"] else PREDICTED}
        if x is not None:
            speed.plot([i], [x], **style)
        quality.plot([i], [c["mean_kld"]], **style)
    if axis.budget is not None:
        speed.axhline(axis.budget, color=BUDGET, linestyle="--")
    speed.set_ylabel(axis.label.split(" (")[0])
    quality.set_ylabel("mean KLD")
    quality.set_xticks(list(order), [c["id"] for c in candidates], rotation=90, fontsize=7)
    quality.set_xlabel("candidates in the order the search built them")
    for ax in (speed, quality):
        ax.grid(alpha=0.3)
    return _svg(fig)


def prediction_plot(candidates: list[dict[str, Any]]) -> str | None:
    """The latency model's predicted speed-up against the measured one, for the timed candidates
    it predicted (None when it predicted none)."""
    pairs = [(c["predicted_speedup"], c["speedup"], c["id"]) for c in candidates
             if c["measured"] and c.get("predicted_speedup") is not None and c["speedup"] is not None]
    if not pairs:
        return None
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    for predicted, measured, cid in pairs:
        ax.plot([predicted], [measured], marker="o", color=TIMED, linestyle="none")
        ax.annotate(cid, (predicted, measured), textcoords="offset points", xytext=(4, 4), fontsize=7)
    lo = min(min(p[:2]) for p in pairs) * 0.95
    hi = max(max(p[:2]) for p in pairs) * 1.05
    ax.plot([lo, hi], [lo, hi], color=PREDICTED, linestyle=":", label="prediction = measurement")
    ax.set_xlabel("predicted speed-up (x)")
    ax.set_ylabel("measured speed-up (x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _svg(fig)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, fmt)


def describe_plan(plan: dict[str, Any]) -> str:
    """A plan in a few words: the layers dropped, the layers whose heads or FFN were narrowed."""
    parts = []
    if plan.get("drop_layers"):
        parts.append("drop layers " + ", ".join(str(i) for i in plan["drop_layers"]))
    if plan.get("heads"):
        parts.append(f"heads pruned in {len(plan['heads'])} layers")
    if plan.get("ffn"):
        parts.append(f"FFN narrowed in {len(plan['ffn'])} layers")
    return "; ".join(parts) or "no structural change"


def candidate_table(candidates: list[dict[str, Any]]) -> str:
    estimates = any(c.get("estimate_on_target") for c in candidates)
    fleet = len({c.get("device") for c in candidates if c.get("device")}) > 1
    head = ["id", "step", "plan", "runtime", *(["device"] if fleet else []), "MiB", "p90 s", "speed-up", "predicted",
            "decode tok/s", "peak RSS MiB"]
    if estimates:
        head.append('target s <span class="estimated">(estimated, not measured on the target)</span>')
    predicted_kld = any(c.get("predicted_kld") is not None for c in candidates)
    head += ["KLD", *(["predicted KLD"] if predicted_kld else []), "top-1", "PPL", "fate"]
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for c in candidates:
        cls = "selected" if c["selected"] else ("" if c["measured"] else "untimed")
        speed = f"{c['speedup']:.2f}x" if c["speedup"] is not None else "not timed"
        predicted = f"{c['predicted_speedup']:.2f}x" if c.get("predicted_speedup") is not None else ""
        cells = [f'<td class="text">{_e(c["id"])}</td>', f'<td class="text">{_e(c["step"])}</td>',
                 f'<td class="text">{_e(describe_plan(c["plan"]))}</td>', f'<td class="text">{_e(c["runtime"])}</td>',
                 *([f'<td class="text">{_e(c.get("device") or "")}</td>'] if fleet else []),
                 f"<td>{c['size_bytes'] / MIB:.1f}</td>", f"<td>{_num(c['latency_p90_s'], '.3f')}</td>",
                 f"<td>{speed}</td>", f"<td>{predicted}</td>", f"<td>{_num(c['decode_tok_s'], '.1f')}</td>",
                 f"<td>{_num(c['peak_rss_bytes'], '.0f', 1 / MIB)}</td>"]
        if estimates:
            est = c.get("estimate_on_target")
            cells.append(f'<td class="estimated">{est["latency_s"]:.3f}</td>' if est else "<td></td>")
        fate = c["verdict"] + ("; selected" if c["selected"] else "")
        cells.append(f"<td>{c['mean_kld']:.3f}</td>")
        if predicted_kld:
            cells.append(f"<td>{_num(c.get('predicted_kld'), '.3f')}</td>")
        cells += [f"<td>{c['top1_agreement'] * 100:.1f}%</td>",
                  f"<td>{c['perplexity']:.2f}</td>", f'<td class="text">{_e(fate)}</td>']
        rows.append(f'<tr class="{cls}" id="row-{_e(c["id"])}">' + "".join(cells) + "</tr>")
    return '<table id="candidates">' + "".join(rows) + "</table>"


def _figure_block(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _summary(report: dict[str, Any]) -> str:
    search = report["search"]
    by_id = {c["id"]: c for c in search["candidates"]}
    if search["selected"]:
        c = by_id[search["selected"]]
        return (f'<p class="verdict-met">Budget met by {_e(c["id"])} ({_e(c["step"])}): p90 '
                f"{c['latency_p90_s']:.3f} s, {c['speedup']:.2f}x faster than the unpruned model timed alongside; "
                f"mean KLD {c['mean_kld']:.3f}, top-1 agreement {c['top1_agreement'] * 100:.1f}%.</p>")
    c = by_id[search["closest"]]
    speed = f", {c['speedup']:.2f}x faster than the unpruned model" if c["speedup"] is not None else ""
    return (f'<p class="verdict-not-met">Budget not met: the closest candidate was {_e(c["id"])} '
            f"({_e(c['step'])}){speed}.</p>")


def _reachable(search: dict[str, Any]) -> str:
    speedup = search.get("reachable_speedup")
    return f" The best speed-up predicted within the search limits: {speedup:.2f}x." if speedup else ""


def _not_built(search: dict[str, Any]) -> str:
    if not search["not_built"]:
        return ""
    items = "".join(f"<li>{_e(n['step'])}: {_e(n['reason'])}</li>" for n in search["not_built"])
    return f"<h3>Proposed, not built</h3><ul>{items}</ul>"


def _verifications(report: dict[str, Any]) -> str:
    rows = []
    for v in report.get("verifications", []):
        s = v["summary"]
        verdict = "PASS" if v["verdict"] == "meets" else f"FAIL: {v['verdict']}"
        rows.append(f"<tr><td class='text'>{_e(v['measured'])}</td><td class='text'>{_e(v['device'])}</td>"
                    f"<td class='text'>{_e(v['cpu'])}</td><td>{s['latency_p50_s']:.3f}</td>"
                    f"<td>{s['latency_p90_s']:.3f}</td><td>{s['decode_tok_s_p50']:.1f}</td>"
                    f"<td>{v['peak_rss_bytes'] / MIB:.0f}</td><td class='text'>{_e(verdict)}</td></tr>")
    if not rows:
        return ("<h2>Verified on the device</h2><p class=\"estimated\">Not yet verified on the target: run "
                "<code>edgeprune verify</code> on the device; its figures are written back here.</p>")
    head = "".join(f"<th>{h}</th>" for h in ("when", "device", "CPU", "p50 s", "p90 s", "decode tok/s",
                                              "peak RSS MiB", "verdict"))
    return f"<h2>Verified on the device</h2><table id='verifications'><tr>{head}</tr>{''.join(rows)}</table>"


def render_html(report: dict[str, Any]) -> str:
    """The whole page, from report.json's content."""
    search, target, device = report["search"], report["target"], report["device"]
    candidates = search["candidates"]
    axis = Axis.for_budget(search["budget"])
    with matplotlib.rc_context(SVG_STYLE):
        tradeoff = tradeoff_plot(candidates, axis)
        trajectory = trajectory_plot(candidates, axis)
        predictions = prediction_plot(candidates)
    fleet = fleet_of(device)
    measured_on = f"{', '.join(fleet['urls'])} ({device['arch']})" + "".join(
        f"; {url} dropped out: {why}" for url, why in fleet["dropped"].items())
    estimated = any(c.get("estimate_on_target") for c in candidates)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgeprune build: {_e(report['model']['id'])} for {_e(target['name'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>edgeprune build: {_e(report['model']['id'])} for target <code>{_e(target['name'])}</code></h1>",
        f"<p><em>{_e(target['description'])}</em></p>",
        _summary(report),
        f"<p>Budget: {_e(search['budget']['description'])}. Search ({_e(search.get('strategy', 'greedy'))}) "
        f"stopped: {_e(search['stop_reason'])}.{_reachable(search)}</p>",
        f"<p>Measured on {_e(measured_on)}.</p>",
    ]
    if estimated:
        parts.append(f'<p class="estimated">Latencies on {_e(target["name"])} are estimated from this device\'s '
                     "measurements by the roofline model: estimated, not measured on the target.</p>")
    parts += ["<ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.get("notes", [])) + "</ul>",
              "<h2>Speed against quality</h2>",
              _figure_block(tradeoff, "Each candidate at its measured speed (filled) or, when the latency model "
                            "skipped timing it, at its predicted speed (hollow); the dashed line is the budget, the "
                            "green steps the Pareto front of the timed candidates, the star the pick."),
              "<h2>Search trajectory</h2>",
              _figure_block(trajectory, "Speed and KLD of each candidate in the order the search built them.")]
    if predictions is not None:
        parts += ["<h2>Latency model: predicted against measured</h2>",
                  _figure_block(predictions, "Points below the dotted line: the model was optimistic; above it: "
                                "pessimistic (the search widens its skip margin by the under-prediction it measured).")]
    parts += ["<h2>Candidates</h2>", candidate_table(candidates), _not_built(search), _verifications(report)]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in report.get("timings_s", {}).items())
    parts += [f"<p>Time: {_e(timings)}.</p>", "</body></html>"]
    return "\n".join(parts) + "\n"
