"""Log formatting: text for people, JSON lines for collectors; structured fields either way."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            # Milliseconds: lines of one second must still sort (drain, stop, restart).
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        entry.update(_trace_ids())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return line


class _QuietStart(logging.Filter):
    """Workers after the first of --workers N: what they say while starting (a model loaded,
    a version refused, CUDA unavailable) is what the first one says too, from the same files
    and flags; a start that fails reaches the supervisor, which says it once. --log-level
    debug shows every worker's lines."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.starting or record.levelno >= logging.CRITICAL


_QUIET_START = _QuietStart()


def configure_logging(level: str, fmt: str, *, quiet_start: bool = False) -> None:
    """`quiet_start`: nothing below CRITICAL until `started()` (unless the level is DEBUG)."""
    handler = logging.StreamHandler()
    if quiet_start and level != "DEBUG":
        handler.addFilter(_QUIET_START)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def started() -> None:
    """The server serves: from now on every line is printed (see configure_logging)."""
    _QUIET_START.starting = False


@contextlib.contextmanager
def silenced(name: str) -> Iterator[None]:
    """Nothing from logger `name` (and its children) below CRITICAL while this lasts."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


def _trace_ids() -> dict[str, str]:
    """The trace and span of the call being handled, when tracing is on and one is."""
    if _trace is None:
        return {}
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


try:  # optional: the [server] extra installs it; logs work without it
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover
    _trace = None  # type: ignore[assignment]
