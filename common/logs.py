"""Logging set-up: one line per record, JSON, so log pipelines need no parsing rules.

Nothing personal is ever passed to a logger: log ids (parcel, notice, recipient id), never addresses.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from common.telemetry import current_trace_ids


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for attr in ("trace_id", "span_id"):
            value = getattr(record, attr, None)
            if value:
                entry[attr] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the current span to each record, so a log line can be
    found from a trace and back. A filter on the handler, not a logger: it sees every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = current_trace_ids()
        if ids is not None and not getattr(record, "trace_id", None):
            record.trace_id, record.span_id = ids
        return True


# Libraries that log what they send at INFO: httpx writes each request's URL, and a Web Push URL is
# the subscription endpoint, a device's address. Only their warnings and errors are kept.
QUIETED = ("httpx", "httpcore")


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIETED:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
