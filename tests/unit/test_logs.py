"""Logging: ISO times, JSON fields, levels per namespace, secret redaction, rate limits."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from bridge.logs import TRACE, RateLimitedLog, parse_levels, setup_logging

SECRET = "s3cr3t-value-of-the-test"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root handlers and the levels back (setup_logging replaces them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = ("roombus", "aiortc", "aiokafka", "roombus.mqtt")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def capture(level: str = "info", fmt: str = "text", per_logger: str = "") -> io.StringIO:
    out = io.StringIO()
    setup_logging(level, fmt, {SECRET, "abc"}, per_logger=per_logger, stream=out)
    return out


def test_text_lines_have_iso_times_with_milliseconds_and_zone(restore_logging: None) -> None:
    out = capture()
    logging.getLogger("roombus.test").info("hello %s", "there")
    line = out.getvalue().strip()
    assert re.fullmatch(rf"{ISO} INFO roombus\.test: hello there", line), line


def test_json_lines_carry_the_structured_fields(restore_logging: None) -> None:
    out = capture(fmt="json")
    logging.getLogger("roombus.test").warning(
        "rejected", extra={"route": "r1", "room": "lobby", "correlation_id": "c-1"}
    )
    doc = json.loads(out.getvalue())
    assert re.fullmatch(ISO, doc.pop("time"))
    assert doc == {
        "level": "warning",
        "logger": "roombus.test",
        "message": "rejected",
        "route": "r1",
        "room": "lobby",
        "correlation_id": "c-1",
    }


def test_secrets_are_redacted_in_message_and_arguments(restore_logging: None) -> None:
    out = capture(level="trace")
    log = logging.getLogger("roombus.test")
    log.log(TRACE, "secret in the format: " + SECRET)
    log.debug("secret in an argument: %s", SECRET)
    log.error("secret in a field", extra={"participant": SECRET})
    text = out.getvalue()
    assert SECRET not in text
    assert text.count("***") == 2
    assert "secret in an argument: ***" in text


def test_short_secrets_are_left_alone(restore_logging: None) -> None:
    out = capture()
    logging.getLogger("roombus.test").info("abc is too short to redact")
    assert "abc is too short" in out.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_are_redacted_in_exception_text(restore_logging: None, fmt: str) -> None:
    out = capture(fmt=fmt)
    try:
        raise RuntimeError(f"authentication failed for {SECRET}")
    except RuntimeError:
        logging.getLogger("roombus.test").exception("failed")
    text = out.getvalue()
    assert SECRET not in text
    assert "RuntimeError: authentication failed for ***" in (
        json.loads(text)["exception"] if fmt == "json" else text
    )


def test_third_party_libraries_stay_at_warning_at_debug(restore_logging: None) -> None:
    out = capture(level="debug")
    logging.getLogger("aiortc.rtcpeerconnection").debug("v=0 an SDP dump")
    logging.getLogger("aiokafka.conn").info("connected")
    logging.getLogger("aioice.ice").warning("a real warning")
    logging.getLogger("roombus.room").debug("the bridge's own debug line")
    logging.getLogger("roombus.mqtt.paho").debug("paho is ours")
    text = out.getvalue()
    assert "SDP dump" not in text
    assert "connected" not in text
    assert "a real warning" in text
    assert "the bridge's own debug line" in text
    assert "paho is ours" in text


def test_trace_lets_the_libraries_speak(restore_logging: None) -> None:
    out = capture(level="trace")
    logging.getLogger("aiortc.rtcpeerconnection").debug("v=0 an SDP dump")
    assert re.search(rf"{ISO} DEBUG aiortc\.rtcpeerconnection: v=0 an SDP dump", out.getvalue())


def test_error_level_quiets_library_warnings_too(restore_logging: None) -> None:
    out = capture(level="error")
    logging.getLogger("aiokafka").warning("noise")
    logging.getLogger("roombus.bridge").warning("ours")
    assert out.getvalue() == ""


def test_per_logger_levels(restore_logging: None) -> None:
    out = capture(level="info", per_logger="aiortc=debug, roombus.mqtt=warning")
    logging.getLogger("aiortc.rtcdtlstransport").debug("dtls detail")
    logging.getLogger("roombus.mqtt").info("mqtt info")
    logging.getLogger("roombus.kafka").info("kafka info")
    text = out.getvalue()
    assert "dtls detail" in text
    assert "mqtt info" not in text
    assert "kafka info" in text


def test_per_logger_levels_from_the_environment(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROOMBUS_LOG_LEVELS", "aiokafka=info")
    out = io.StringIO()
    setup_logging("info", "text", (), stream=out)
    logging.getLogger("aiokafka.consumer").info("assigned")
    assert "assigned" in out.getvalue()


def test_a_second_setup_forgets_the_first_per_logger_levels(restore_logging: None) -> None:
    capture(per_logger="aiortc=debug")
    out = capture()
    logging.getLogger("aiortc").debug("gone")
    assert out.getvalue() == ""


@pytest.mark.parametrize("text", ["aiortc", "aiortc=loud", "=debug"])
def test_malformed_per_logger_levels(text: str) -> None:
    with pytest.raises(ValueError, match="ROOMBUS_LOG_LEVELS"):
        parse_levels(text)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_logs_first_then_once_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("roombus.test.rate"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "roombus.test.rate"):
        assert limited.warning("k", "rejected %s", "m1")
        for i in range(5):
            clock.now += 1
            assert not limited.warning("k", "rejected %s", f"m{i}")
        assert limited.warning("other", "another key")
        clock.now += 6  # 11 s after the first line
        assert limited.warning("k", "rejected %s", "m7")
        assert not limited.warning("k", "rejected %s", "m8")
        clock.now += 10
        assert limited.warning("k", "rejected %s", "m9")
    assert [r.getMessage() for r in caplog.records] == [
        "rejected m1",
        "another key",
        "rejected m7 (5 similar suppressed)",
        "rejected m9 (1 similar suppressed)",
    ]


def test_rate_limit_counts_nothing_when_the_level_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("roombus.test.off")
    limited = RateLimitedLog(logger, interval=10.0, clock=Clock())
    with caplog.at_level(logging.ERROR, "roombus.test.off"):
        assert not limited.warning("k", "quiet")
    assert caplog.records == []


def test_rate_limit_remembers_a_bounded_number_of_keys() -> None:
    limited = RateLimitedLog(logging.getLogger("roombus.test.keys"), clock=Clock())
    limited.MAX_KEYS = 3
    for key in range(10):
        limited.warning(key, "x")
    assert len(limited._state) == 3
