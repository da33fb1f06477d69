"""Logging with the request id on every line (a context variable set per request), as text
or as one JSON object per line (`--log-format json`: what log pipelines ingest)."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextvars import ContextVar
from enum import StrEnum

import msgspec

from segue import tracing

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
FORMAT_ENV = "SEGUE_LOG_FORMAT"  # children of `segue serve` and of a frontend inherit it


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class _Fields:
    """What every line carries besides its message: set once the process knows it."""

    worker_id = ""


fields = _Fields()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One object per line: time (UTC, ISO 8601), level, logger, process, pid, message (the
    text a text line has, so grep finds it either way), request id, worker id where there
    is one, the trace and span ids of a traced request, and the exception's traceback when
    there is one."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process
        self._encode = msgspec.json.Encoder().encode

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": self.process,
            "pid": record.process,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if fields.worker_id:
            line["worker_id"] = fields.worker_id
        span = tracing.current.get()
        if span is not None:
            line["trace_id"], line["span_id"] = tracing.ids(span)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self._encode(line).decode()


def setup_logging(process: str, level: str = "INFO", fmt: LogFormat | None = None) -> None:
    fmt = fmt or LogFormat(os.environ.get(FORMAT_ENV, LogFormat.TEXT))
    os.environ[FORMAT_ENV] = fmt  # the processes this one starts log alike
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s "
                "[%(request_id)s] %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
