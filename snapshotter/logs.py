"""Structured JSON logs: one object per line on stderr.

Stable keys every record has: `time` (RFC 3339, UTC, microseconds), `level`
(debug|info|warning|error|critical), `logger`, `msg`. Values passed with
`extra={...}` become further top-level keys; an exception adds `exc`.
Tests and operators may rely on these names.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a LogRecord as one JSON object (see module docstring for keys)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        out: dict[str, Any] = {
            "time": ts.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=repr, ensure_ascii=False)


QUIET_LIBRARIES = ("httpx", "httpcore", "hpack")
"""Libraries whose records stop at WARNING whatever the level: they log every request with its
URL (a redirect target is often a presigned storage URL, i.e. a credential) and every protocol
step; the daemon's own records say what was fetched and why."""


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Route the root logger to `stream` (stderr by default) as JSON at `level`; the
    `QUIET_LIBRARIES` log only warnings and errors.

    Raises ValueError for a level not in LEVELS.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}, expected one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
