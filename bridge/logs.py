"""Logging of the daemon: levels, text and JSON formats, secret redaction, rate limits.

`setup_logging(level, fmt, secrets)` sends every record to stderr:

* levels ``trace`` (below DEBUG), ``debug``, ``info``, ``warning``, ``error``. The bridge's own
  loggers (``roombus.*``) log at the chosen level; third-party libraries (aiortc, aioice,
  aiokafka, websockets, aiohttp, asyncio...) at WARNING or above unless the level is ``trace``,
  so ``debug`` shows the bridge and not aiortc's SDP dumps. ``$ROOMBUS_LOG_LEVELS`` sets single
  loggers: ``aiortc=debug,roombus.mqtt=info``.
* ``text``: ``2026-12-01T13:31:14.123+00:00 INFO roombus.bridge: message``; ``json``: one
  object per line with ``time`` (same ISO 8601 form), ``level``, ``logger``, ``message``, the
  structured fields of `FIELDS` given with ``extra=``, and ``exception``.
* every secret of the configuration becomes ``***`` in messages, arguments, exception and stack
  texts and fields, at every level (a filter on the handler, so no logger can bypass it).

`RateLimitedLog` keeps per-message warnings (a rejected message, a failed delivery) to one line
per key and interval, counting what it held back.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bridge.config import REDACTED, secrets_pattern

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS: Mapping[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
OWN = "roombus"
# Structured fields a record may carry (``extra={"route": ...}``): top-level keys in JSON.
FIELDS = ("route", "room", "participant", "bus", "correlation_id")
LEVELS_ENV = "ROOMBUS_LOG_LEVELS"

# Loggers `setup_logging` set a level on, reset by the next call (tests call it repeatedly).
_configured: set[str] = set()


def iso_time(created: float) -> str:
    """``2026-12-01T13:31:14.123+00:00``: local time with milliseconds and its UTC offset."""
    moment = datetime.datetime.fromtimestamp(created).astimezone()
    return moment.isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message`` lines, with an ISO 8601 time."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The record's time in ISO 8601 with milliseconds and time zone."""
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, structured fields as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON."""
        doc: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False)


class RedactingFilter(logging.Filter):
    """Replaces every secret by ``***`` in a record before any formatter sees it."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = frozenset(secrets)
        self.pattern = secrets_pattern(self.secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Redact `secrets` too (a reloaded configuration's; the old ones stay redacted)."""
        self.secrets |= frozenset(secrets)
        self.pattern = secrets_pattern(self.secrets)

    def redact(self, text: str) -> str:
        """`text` without secrets."""
        return text if self.pattern is None else self.pattern.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact `record` in place (message with its arguments, exception, stack, fields)."""
        if self.pattern is None:
            return True
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            # The formatter would render it later, unredacted: render it now, once.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for name in FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, self.redact(value))
        return True


def parse_levels(text: str) -> dict[str, int]:
    """``aiortc=debug,roombus.mqtt=info`` as {logger: level}; raises ValueError when malformed."""
    levels: dict[str, int] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, level = item.partition("=")
        name, level = name.strip(), level.strip().lower()
        if not sep or not name or level not in LEVELS:
            raise ValueError(
                f"{LEVELS_ENV}: {item!r} is not logger=level (levels: {', '.join(LEVELS)})"
            )
        levels[name] = LEVELS[level]
    return levels


def setup_logging(
    level: str = "info",
    fmt: str = "text",
    secrets: Iterable[str] = (),
    *,
    per_logger: str | None = None,
    stream: Any = None,
) -> logging.Handler:
    """Log to stderr (or `stream`) as the module docstring says; returns the handler.

    `per_logger` defaults to ``$ROOMBUS_LOG_LEVELS``; a malformed value raises ValueError.
    """
    chosen = LEVELS[level]
    overrides = parse_levels(os.environ.get(LEVELS_ENV, "") if per_logger is None else per_logger)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The root's level is the third-party libraries' (their loggers inherit it); ours is set
    # on the roombus logger. trace lets everything through.
    root.setLevel(chosen if chosen == TRACE else max(chosen, logging.WARNING))
    for name in _configured:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _configured.clear()
    for name, value in {OWN: chosen, **overrides}.items():
        logging.getLogger(name).setLevel(value)
        _configured.add(name)
    return handler


class RateLimitedLog:
    """Per-key rate limit for warnings logged per message.

    The first occurrence of a key is logged; later ones at most once per `interval` seconds,
    with ``(N similar suppressed)`` appended for those held back since the last line.
    """

    MAX_KEYS = 10_000  # keys remembered at most (they may hold room names): oldest forgotten

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._state: dict[object, tuple[float, int]] = {}  # key -> (last logged, suppressed)

    def warning(self, key: object, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log at WARNING unless `key` was logged less than `interval` ago; True if logged."""
        return self.log(logging.WARNING, key, msg, *args, **kwargs)

    def log(self, level: int, key: object, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log at `level` under the rate limit of `key`; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        state = self._state.get(key)
        if state is not None and now - state[0] < self.interval:
            self._state[key] = (state[0], state[1] + 1)
            return False
        suppressed = state[1] if state is not None else 0
        self._state.pop(key, None)
        if len(self._state) >= self.MAX_KEYS:
            del self._state[next(iter(self._state))]
        self._state[key] = (now, 0)
        if suppressed:
            msg = f"{msg} ({suppressed} similar suppressed)"
        self.logger.log(level, msg, *args, **kwargs)
        return True
