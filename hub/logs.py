"""Logging configuration: uvicorn's human format or one JSON object per line
(``HUB_JSON_LOGS=1``), and secrets scrubbed from every line in both.

``log_config()`` returns a :func:`logging.config.dictConfig` dictionary shaped like
uvicorn's own ``LOGGING_CONFIG`` (same formatter and handler names), so it is passed to
``uvicorn.Config(log_config=...)`` as is. Hub's loggers (``hub``, ``hub.redis``, …) get the
same handler as uvicorn's, so a JSON deployment never mixes formats.

Tokens must never reach a log: a client may put one in a query string (which the access
log prints), an exception message may quote a header, a Redis URL carries its password,
an Engine.IO ``sid`` in a polling URL is a session credential.
The formatters redact the finished line, whatever produced it.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from uvicorn.logging import AccessFormatter, DefaultFormatter

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A JWT anywhere: every JWT header starts with base64url('{"') == "eyJ".
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted]"),
    # Authorization header values that are not JWTs (opaque tokens).
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), r"\1[redacted]"),
    # token=…, access_token=…, ks_access_token=…, password=… in query strings or cookies.
    (re.compile(r"(?i)\b((?:[a-z_]*token|jwt|password|secret|auth)=)[^&\s\"';]+"),
     r"\1[redacted]"),
    # Session ids: an Engine.IO ``sid`` is a session credential (whoever polls with it
    # reads that session's events).
    (re.compile(r"(?i)(?<![a-z0-9_])((?:sid|session_?id)=)[^&\s\"';]+"),
     r"\1[redacted]"),
    # The password part of redis://user:password@host URLs.
    (re.compile(r"(?i)\b(rediss?(?:\+sentinel)?://[^:/@\s]*:)[^@\s]+@"), r"\1***@"),
)


def redact(text: str) -> str:
    """``text`` with tokens, bearer values, secret query parameters and URL passwords
    replaced."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(DefaultFormatter):
    """uvicorn's default formatter, secrets removed."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingAccessFormatter(AccessFormatter):
    """uvicorn's access-log formatter, secrets removed (query strings are logged)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339 UTC), ``level``, ``logger``, ``msg``,
    ``pid``; access-log lines add ``client``, ``method``, ``path``, ``status``; errors add
    ``exc``. Every string is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, http_version, status = args
            path = redact(str(path))
            entry.update(msg=f"{method} {path} {status}", client=str(client),
                         method=str(method), path=path,
                         http_version=str(http_version), status=status)
        else:
            entry["msg"] = redact(record.getMessage())
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = redact(record.exc_text)
        return orjson.dumps(entry, default=str).decode()


class RateLimitFilter(logging.Filter):
    """At most one record per message and exception type per ``interval`` seconds; the
    next one that passes says how many were suppressed.

    python-engineio and python-socketio log a full traceback (about 2 KB) for every
    malformed packet a client sends, connected or not: without a bound, any client can
    fill the disk. The first of each kind keeps its traceback, for the bug it may be."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = (str(record.msg), type(exc).__name__ if exc is not None else "")
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        if more:
            record.msg = f"{record.getMessage()} ({more} more like it suppressed)"
            record.args = ()
        return True


def log_config(json_logs: bool, level: str = "info") -> dict[str, Any]:
    """A dictConfig for uvicorn and hub: human-readable, or JSON lines with ``json_logs``."""
    upper = level.upper()
    if json_logs:
        formatters: dict[str, Any] = {
            "default": {"()": "hub.logs.JsonFormatter"},
            "access": {"()": "hub.logs.JsonFormatter"},
        }
    else:
        formatters = {
            "default": {"()": "hub.logs.RedactingFormatter",
                        "fmt": "%(levelprefix)s %(message)s", "use_colors": None},
            "access": {"()": "hub.logs.RedactingAccessFormatter",
                       "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" '
                              "%(status_code)s"},
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": formatters,
        "handlers": {
            "default": {"formatter": "default", "class": "logging.StreamHandler",
                        "stream": "ext://sys.stderr"},
            # JSON lines all go to one stream, so a log shipper reads one file.
            "access": {"formatter": "access", "class": "logging.StreamHandler",
                       "stream": "ext://sys.stderr" if json_logs else "ext://sys.stdout"},
        },
        "filters": {"rate_limit": {"()": "hub.logs.RateLimitFilter"}},
        "root": {"handlers": ["default"], "level": "WARNING"},
        "loggers": {
            "hub": {"level": upper},
            "uvicorn": {"handlers": ["default"], "level": upper, "propagate": False},
            "uvicorn.error": {"level": upper},
            "uvicorn.access": {"handlers": ["access"], "level": upper, "propagate": False},
            # Configured here, python-engineio/socketio add no StreamHandler of their own
            # (which printed unredacted lines); their per-packet tracebacks are bounded.
            "engineio.server": {"level": "ERROR", "filters": ["rate_limit"]},
            "socketio.server": {"level": "ERROR", "filters": ["rate_limit"]},
        },
    }


class RateLimitedLog:
    """Log a recurring problem once, then at most once per ``every_s`` per key, with how
    many were not logged in between: a flood of bad input must not flood the log."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0,
                 max_keys: int = 256) -> None:
        self._log = logger
        self._every_s = every_s
        self._max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, suppressed)

    def warning(self, key: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        logged_at, suppressed = self._last.get(key, (-1e18, 0))
        if now - logged_at < self._every_s:
            self._last[key] = (logged_at, suppressed + 1)
            return
        if len(self._last) >= self._max_keys and key not in self._last:
            self._last.pop(next(iter(self._last)))
        self._last[key] = (now, 0)
        if suppressed:
            message += " (%d more like it since the last report)"
            args = (*args, suppressed)
        self._log.warning(message, *args, exc_info=exc_info)
