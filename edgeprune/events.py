"""Log records a program can follow: `event()` names a record and attaches its fields, and
`--log-json` writes every record as one JSON object per line on stderr (named ones with their
fields), so a long build can be watched by a dashboard as well as by a person."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

# Events a build emits, each with its fields (README: "Following a long build").
STAGE = "stage"  # name: calibration, importance, reference, search, settings, bundle
CANDIDATE = "candidate"  # id, step, phase (building, built, timed, skipped), and the figures known
SEARCH = "search"  # built, limit, timed, best, closest, elapsed_s, eta_s
DEVICE = "device"  # url, phase (dropped), reason: a fleet's device leaving the build
ERROR = "error"  # the one-sentence error a command ends with

_json = False


def event(logger: logging.Logger, kind: str, message: str, /, *args: Any, **fields: Any) -> None:
    """Log `message` (for people) as an event of `kind` with `fields` (for programs)."""
    logger.info(message, *args, extra={"event": kind, "fields": fields})


def warning_event(logger: logging.Logger, kind: str, message: str, /, *args: Any, **fields: Any) -> None:
    """An event that is also a warning: shown even with -q."""
    logger.warning(message, *args, extra={"event": kind, "fields": fields})


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        name = getattr(record, "event", None)
        if name is not None:
            out["event"] = name
            out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_json(enabled: bool) -> None:
    """Write every log record of the root logger as a JSON line (its handlers' formatter replaced)."""
    global _json
    _json = enabled
    if enabled:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLines())


def json_enabled() -> bool:
    return _json
