"""Diagnostics as JSON lines, for an agent whose audit stream is stderr.

Outside systemd, ``femd run`` writes its audit entries to stderr as one JSON
object per line; its diagnostics (``logging``) share that stream, so they take
the same shape: ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``CODE_*``
like a journal entry, and a traceback inside the record as
``FEMD_TRACEBACK``, never as lines of its own. Uncaught exceptions in any
thread and Python warnings go through the same handler. Under systemd the
journal splits lines itself and the plain ``femd: LEVEL: message`` stays.

Owns the formatter and ``use_json_lines()``; does not choose the audit
transport (``audit`` does).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from types import TracebackType
from typing import Final

from femd.errors import printable

__all__ = ["JsonLineFormatter", "use_json_lines"]

# logging levels to syslog priorities, as journald's own handlers map them.
_PRIORITY: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4))


def _priority(level: int) -> str:
    for floor, prio in _PRIORITY:
        if level >= floor:
            return str(prio)
    return "6" if level >= logging.INFO else "7"


class JsonLineFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line (all values strings)."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a JSON object; a traceback becomes a field."""
        fields = {
            "MESSAGE": printable(record.getMessage()),
            "PRIORITY": _priority(record.levelno),
            "SYSLOG_IDENTIFIER": "femd",
            "FEMD_LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "THREAD": record.threadName or "",
            "__REALTIME_TIMESTAMP": str(int(record.created * 1e6)),
        }
        if record.exc_info and record.exc_info[0] is not None:
            fields["FEMD_TRACEBACK"] = printable(self.formatException(record.exc_info))
        if record.stack_info:
            fields["FEMD_STACK"] = printable(record.stack_info)
        return json.dumps(fields, separators=(",", ":"))


_logger = logging.getLogger("femd")


def _uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    _logger.critical(
        "uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, tb)
    )


def _thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    _logger.critical(
        "thread %s died: %s: %s",
        args.thread.name if args.thread else "?",
        args.exc_type.__name__,
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


def use_json_lines() -> None:
    """Make every diagnostic on stderr one JSON line, tracebacks included."""
    formatter = JsonLineFormatter()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(formatter)
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = _thread_uncaught
    # A last resort that must not print lines of its own either.
    logging.raiseExceptions = False
