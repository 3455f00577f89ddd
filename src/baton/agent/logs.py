"""Structured logs on stderr: one line per event, text for people or JSON lines for the journal's consumers.

Callers log an event name as the message and its facts as ``extra={"fields": {...}}``::

    log.info("watch.attached", extra={"fields": {"name": "data", "epoch": 7}})

Text:  ``2026-11-24T17:00:00Z INFO watch.attached name=data epoch=7``
JSON:  ``{"ts": "2026-11-24T17:00:00.123Z", "level": "info", "logger": "baton.agent", "event": "watch.attached",
"name": "data", "epoch": 7}``
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO


def _ts(record: logging.LogRecord, ms: bool) -> str:
    t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{t}.{int(record.msecs):03d}Z" if ms else f"{t}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    f = getattr(record, "fields", None)
    return dict(f) if isinstance(f, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Reserved keys (ts, level, logger, event) win over fields of the same name."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = _fields(record)
        out.update(ts=_ts(record, True), level=record.levelname.lower(), logger=record.name,
                   event=record.getMessage())
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, sort_keys=False)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL event key=value ...``; values with spaces are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record, False), record.levelname, record.getMessage()]
        for k, v in _fields(record).items():
            s = str(v)
            parts.append(f"{k}={json.dumps(s) if (' ' in s or not s) else s}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(fmt: str = "text", stream: TextIO | None = None, level: int = logging.INFO) -> logging.Handler:
    """Send the ``baton`` loggers to ``stream`` (stderr) in ``fmt`` (text | json); returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("baton")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return handler
