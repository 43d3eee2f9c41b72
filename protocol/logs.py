"""Structured logs: one JSON object a line, with ids, sizes and durations, never content.

Every component logs through `event()`; callers pass only fields that cannot carry a question,
an answer, a key or a credential (ids, codes, counts, byte sizes, durations).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info and record.levelno >= logging.ERROR:
            # The exception's type only: messages and tracebacks can quote data.
            line["exception"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps(line, separators=(",", ":"), default=str)


def configure(component: str, level: str = "INFO", stream: Any = None) -> logging.Logger:
    """Route the root logger to JSON lines on `stream` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that may log request bodies or headers at DEBUG stay at WARNING.
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(component)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, name, extra={"fields": fields})


class Timer:
    """Milliseconds since creation, for the `*_ms` fields of log lines."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def ms(self) -> float:
        return round((time.monotonic() - self.start) * 1000, 1)
