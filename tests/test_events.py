"""Events a program can follow: named log records with their fields, as JSON lines with --log-json."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

from edgeprune.events import CANDIDATE, ERROR, SEARCH, JsonLines, event


def test_json_lines_carry_the_event_and_its_fields():
    logger = logging.getLogger("edgeprune.test-events")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        event(logger, CANDIDATE, "%s %s: built", "c01", "-2 layers", id="c01", kld=0.5, speedup=None)
        logger.warning("plain %d", 3)
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == CANDIDATE and first["message"] == "c01 -2 layers: built"
    assert first["id"] == "c01" and first["kld"] == 0.5 and first["speedup"] is None and first["level"] == "info"
    assert second == {"time": second["time"], "level": "warning", "logger": "edgeprune.test-events",
                      "message": "plain 3"}


def test_a_commands_error_is_one_json_line_with_its_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "build", "--target", "nope", "-o", str(tmp_path / "o"),
                           "--log-json"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["event"] == ERROR and record["exit_code"] == 2 and record["level"] == "error"
    assert "Unknown target 'nope'" in record["message"]
    assert not (tmp_path / "o").exists()


def test_search_events_name_each_candidates_phases_and_the_progress(caplog):
    from test_search import SLO, Synthetic, greedy_search, space

    caplog.set_level(logging.INFO, logger="edgeprune.search")
    out = greedy_search(space(), Synthetic(), SLO(prompt_tokens=8, answer_tokens=8, speedup=1.3), 16)
    named = [(r.event, r.fields) for r in caplog.records if hasattr(r, "event")]
    phases: dict[str, list[str]] = {}
    for name, fields in named:
        if name == CANDIDATE:
            phases.setdefault(fields["id"], []).append(fields["phase"])
    assert set(phases) == {c.id for c in out.candidates}
    assert all(p[0] == "building" and p[1] in ("timed", "skipped") for p in phases.values())
    progress = [fields for name, fields in named if name == SEARCH]
    assert len(progress) == len(out.candidates)  # one after each candidate is judged
    assert [p["built"] for p in progress] == sorted(p["built"] for p in progress)
    assert all(p["eta_s"] >= 0 and p["limit"] == 16 for p in progress)
    assert progress[-1]["best"] == out.selected.id and progress[0]["best"] is None
