"""Logging for every `w2s` command: one setup, text or JSON lines, each line with its request id.

`setup_logging` is the only place that configures the root logger. The server's middleware
(proxy.serving.app) puts each request's id in `REQUEST_ID` (a context variable, so the tasks a
request starts inherit it and concurrent requests never see each other's); a filter on the
handler copies it onto every record as `request_id`, whichever logger wrote it.

    text  2026-12-07 10:00:00,123 WARNING w2s.server [req_ab12]: upstream failed ...
    json  {"time": "2026-12-07T10:00:00.123+00:00", "level": "WARNING", "logger": "w2s.server",
           "message": "upstream failed ...", "request_id": "req_ab12"}

`quiet_libraries` keeps torch's and transformers' FutureWarnings and UserWarnings (and their
loggers' chatter and weight-loading bars) out of the server log and off the progress line; our
own warnings stay.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import uuid
import warnings
from datetime import datetime, timezone
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("w2s_request_id", default=None)
"""The id of the request being served in this context (None outside one)."""

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_LIBRARIES = ("torch", "transformers", "huggingface_hub", "accelerate", "peft", "tokenizers", "datasets",
              "safetensors", "gguf")
_TEXT = "%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s"


def request_id_from(header: str | None) -> str:
    """A client's `x-request-id` when it is sane (1-128 characters of a URL-safe set, so it is
    safe in a header and a log line), else a fresh one (`req_` and 32 hex digits)."""
    if header is not None and _CLIENT_ID.fullmatch(header):
        return header
    return f"req_{uuid.uuid4().hex}"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id (`request_id`, None outside a request);
    an id already on the record (`extra={"request_id": ...}`) is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """The usual line, with ` [request id]` after the logger's name inside a request."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, request_id, and
    `exception` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def level_for(verbosity: int) -> int:
    """-q: errors only; none: warnings; -v: info; -vv: debug."""
    if verbosity < 0:
        return logging.ERROR
    return (logging.WARNING, logging.INFO)[verbosity] if verbosity < 2 else logging.DEBUG


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours on the root logger (a second setup replaces it, and leaves others' handlers be);
    without a stream it writes to whatever sys.stderr is when a line is written."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream)
        self._stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self._stderr:
            self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbosity: int = 0, log_format: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger: level from `verbosity`, lines in `log_format` ("text" or
    "json") on `stream` (sys.stderr), each with its request id. Returns the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (known: {', '.join(LOG_FORMATS)})")
    handler = _Handler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_for(verbosity))
    quiet_libraries(verbosity)
    return handler


def quiet_libraries(verbosity: int = 0) -> None:
    """Keep the libraries' FutureWarnings, UserWarnings and DeprecationWarnings (raised in their
    own modules) and their loggers' notices below ERROR out of our output; -vv shows them all."""
    if verbosity > 1:
        return
    pattern = r"(%s)(\.|$)" % "|".join(_LIBRARIES)
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=pattern)
    # transformers sets its logger's level from $TRANSFORMERS_VERBOSITY when it is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # and its "Loading weights" bars from huggingface_hub's switch, read when it is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    loaded = sys.modules.get("transformers.utils.logging")
    if loaded is not None and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        loaded.disable_progress_bar()
    for name in _LIBRARIES:  # and the others' loggers, without importing any of them
        logging.getLogger(name).setLevel(logging.ERROR)
