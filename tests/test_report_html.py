"""report.html: self-contained, one point per candidate, the budget line; rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO
from edgeprune.report_html import Axis, describe_plan, pareto_front, render_html

ARTIFACTS = REPO / ".cache" / "tests" / "artifacts"


def candidate(cid: str, speedup: float | None, kld: float, predicted: float | None = None,
              selected: bool = False, verdict: str = "short of the speed-up") -> dict:
    measured = speedup is not None
    return {
        "id": cid, "step": f"step of {cid}", "runtime": "llama.cpp",
        "plan": {"drop_layers": [3, 4], "heads": {"5": [0, 1]}} if cid != "c00" else {"drop_layers": [], "heads": {}},
        "size_bytes": 90 << 20, "parameters": 1, "measured": measured,
        "latency_p50_s": 0.5 / speedup if measured else None, "latency_p90_s": 0.55 / speedup if measured else None,
        "latency_spread": 0.02 if measured else None, "speedup": speedup, "ttft_p50_s": 0.05 if measured else None,
        "prefill_tok_s": 900.0 if measured else None, "decode_tok_s": 80.0 * (speedup or 1) if measured else None,
        "peak_rss_bytes": 300 << 20 if measured else None,
        "perplexity": 10 + 10 * kld, "mean_kld": kld, "top1_agreement": 1 - kld / 4,
        "verdict": verdict if measured else "not timed (predicted 1.05x, short of 1.4x)",
        "confirmed": selected, "selected": selected,
        "predicted_on_device": {"latency_s": 0.5 / (predicted or 1)} if predicted else None,
        "predicted_speedup": predicted, "estimate_on_target": None, "benchmark": None,
    }


def report(candidates: list[dict], selected: str | None, budget: dict | None = None) -> dict:
    return {
        "model": {"id": "SmolLM2-135M-Instruct"},
        "target": {"name": "demo", "description": "this machine <with> markup"},
        "device": {"url": "local", "arch": "x86_64"},
        "notes": ["measured on the target's own architecture"],
        "search": {
            "budget": budget or {"latency_s": None, "speedup": 1.4, "ram_bytes": None,
                                 "description": ">= 1.4x faster than the unpruned model (timed alongside)"},
            "stop_reason": "found a candidate within budget",
            "candidates": candidates, "selected": selected, "closest": selected or candidates[-1]["id"],
            "budget_met": selected is not None,
            "not_built": [{"step": "-1 attention", "reason": "predicted 1.01x"}],
        },
        "timings_s": {"search": 120.0, "total": 150.0},
    }


CANDIDATES = [
    candidate("c00", 1.0, 0.02, verdict="short of the speed-up"),
    candidate("c01", 1.2, 0.30, predicted=1.15),
    candidate("c02", None, 0.9, predicted=1.05),
    candidate("c03", 1.45, 0.50, predicted=1.30, selected=True, verdict="meets"),
    candidate("c04", 1.40, 0.80, predicted=1.35),  # dominated by c03
]


def test_pareto_front_keeps_only_the_undominated_fastest_first():
    points = [(1.0, 0.02, "a"), (1.2, 0.3, "b"), (1.45, 0.5, "c"), (1.4, 0.8, "d"), (1.1, 0.4, "e")]
    assert [p[2] for p in pareto_front(points, faster_is_larger=True)] == ["c", "b", "a"]
    latencies = [(0.5, 0.02, "a"), (0.4, 0.3, "b"), (0.45, 0.6, "c")]
    assert [p[2] for p in pareto_front(latencies, faster_is_larger=False)] == ["b", "a"]


def test_axis_follows_the_budget():
    assert Axis.for_budget({"speedup": 1.3, "latency_s": 2.0}).faster_is_larger
    axis = Axis.for_budget({"speedup": None, "latency_s": 2.0})
    assert not axis.faster_is_larger and axis.budget == 2.0
    assert axis.predicted(CANDIDATES[1]) == pytest.approx(0.5 / 1.15)
    assert describe_plan({"drop_layers": [], "heads": {}}) == "no structural change"
    assert describe_plan({"drop_layers": [2, 3], "ffn": {"1": "x"}}) == "drop layers 2, 3; FFN narrowed in 1 layers"


def test_page_is_self_contained_with_one_point_per_candidate_and_the_budget_line():
    page = render_html(report(CANDIDATES, "c03"))
    assert page == render_html(report(CANDIDATES, "c03")), "the same report renders to the same bytes"
    assert re.findall(r'id="candidate-(c\d+)"', page) == [c["id"] for c in CANDIDATES]
    for gid in ("budget-line", "pareto-front", "selected"):
        assert page.count(f'id="{gid}"') == 1, gid
    # Offline: nothing is fetched (the only URLs are SVG's namespace names).
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    assert "this machine &lt;with&gt; markup" in page  # what the user wrote is escaped
    assert 'class="selected" id="row-c03"' in page and 'class="untimed" id="row-c02"' in page
    assert "Budget met by c03" in page and "predicted 1.01x" in page and "Not yet verified" in page


def test_a_latency_budget_and_an_unmet_budget_render_too():
    budget = {"latency_s": 0.3, "speedup": None, "ram_bytes": None, "description": "p90 latency <= 0.3 s"}
    page = render_html(report(CANDIDATES[:2], None, budget))
    assert "Budget not met" in page and "p90 latency (s)" in page and page.count('id="budget-line"') == 1
    assert 'id="selected"' not in page


@pytest.mark.slow
def test_headless_chromium_renders_every_candidate_and_the_budget_line(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed (Debian: apt-get install chromium)"
    page = tmp_path / "report.html"
    page.write_text(render_html(report(CANDIDATES, "c03")))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,2400"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    # The DOM as the browser built it: every candidate's point, one budget line, the table's rows.
    assert sorted(re.findall(r'id="candidate-(c\d+)"', dom)) == sorted(c["id"] for c in CANDIDATES)
    assert dom.count('id="budget-line"') == 1 and len(re.findall(r'<tr class="[a-z]*" id="row-', dom)) == 5
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-html.png"
    shot.unlink(missing_ok=True)
    subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120,
                   check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
