"""Structured JSON logs for the API, the trainer and the events consumer: one JSON object a
line, carrying `job_id`, `user_id` and `avatar_id` whenever the code is working for one.

Log lines are an interface too (dashboards and alerts parse them), so the format lives here.
`LOG_FORMAT=text` writes the same fields as one short readable line instead (`make dev` sets
it for the terminal, where several processes share one screen); JSON is the default and what
production runs. Pure stdlib: importing it costs the API's cold start nothing.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

CONTEXT_FIELDS = ("job_id", "user_id", "avatar_id")
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("avatune_log_context")

# Anything that looks like a credential is masked before a line is written, wherever it came from.
_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),  # JWTs
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
    re.compile(r"(?i)((?:x-amz-signature|signature|x-amz-security-token|authorization)[=:]\s*)[^&\s\"']+"),
]


def redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[REDACTED]", text)
    return text


def bind(**fields: str | None) -> contextvars.Token:
    """Add fields to the current log context (a task's or thread's); returns a reset token."""
    current = dict(_context.get({}))
    current.update({k: v for k, v in fields.items() if v is not None})
    return _context.set(current)


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, str]:
    return dict(_context.get({}))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        entry.update(_context.get({}))
        for name in CONTEXT_FIELDS:  # explicit `extra=` wins over the ambient context
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The JSON line's fields as one readable line: `12:48:12.461 trainer info  message  job_id=...`."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = dict(_context.get({}))
        fields.update({name: getattr(record, name) for name in CONTEXT_FIELDS if hasattr(record, name)})
        context = "".join(f"  {k}={v}" for k, v in fields.items())
        line = f"{when} {self._service:<7} {record.levelname.lower():<7} {redact(record.getMessage())}{context}"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


LOG_FORMATS = {"json": JsonFormatter, "text": TextFormatter}
# Libraries' INFO lines that say nothing about a request or a job ("Found credentials in
# environment variables." on every client): their warnings and errors still show.
QUIET_LOGGERS = ("botocore.credentials", "aiobotocore.credentials")


def configure(service: str, level: int = logging.INFO, log_format: str | None = None) -> None:
    """Send every log line (ours, uvicorn's, botocore's, transformers') to stderr, as JSON or,
    with `log_format` (default: LOG_FORMAT, else json) `text`, as readable lines."""
    chosen = (log_format or os.environ.get("LOG_FORMAT") or "json").strip().lower()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LOG_FORMATS.get(chosen, JsonFormatter)(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
