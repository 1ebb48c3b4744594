"""The `roombus` command line — and the composition root that wires config, rooms and buses.

    roombus run CONFIG      run the bridge until SIGTERM/SIGINT (first: drain; second: force)
    roombus check CONFIG    validate the file completely; exit 78 when it is invalid
    roombus schema          print the JSON Schema of the configuration

Exit codes: 0 clean stop; 1 runtime failure; 2 usage; 78 invalid configuration (EX_CONFIG);
130/143 forced by a second signal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from bridge import __version__
from bridge.app import build_bridge
from bridge.config import Config, ConfigError, json_schema, load_config
from bridge.errors import ConnectorError
from bridge.health import HealthServer

log = logging.getLogger("roombus")

EX_CONFIG = 78


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `roombus`."""
    parser = argparse.ArgumentParser(
        prog="roombus", description="Bridge LiveKit rooms to Kafka and MQTT."
    )
    parser.add_argument("--version", action="version", version=f"roombus {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ROOMBUS_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info, or $ROOMBUS_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("ROOMBUS_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text for people, json (one object per line) for containers",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the bridge")
    run.add_argument("config", help="configuration file (YAML)")
    check = sub.add_parser("check", help="validate a configuration file")
    check.add_argument("config", help="configuration file (YAML)")
    sub.add_parser("schema", help="print the configuration's JSON Schema")
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per log record."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON."""
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    """Log to stderr in the chosen format."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless we debug.
    if level != "debug":
        for noisy in ("aioice", "aiortc", "aiokafka", "websockets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


async def run_bridge(config: Config) -> int:
    """Run until a signal; the first drains, the second forces."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0
    main = asyncio.current_task()

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("roombus: %s: draining (send it again to force)", signal.Signals(signum).name)
            stop.set()
        else:
            log.warning("roombus: second signal: forcing exit")
            os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        bridge = build_bridge(config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("roombus: %s", problem)
        return EX_CONFIG
    port = config.bridge.health_port
    health = HealthServer(bridge, port) if port else None
    try:
        if health is not None:
            await health.start()
        await bridge.run(stop)
    except ConnectorError as exc:
        log.error("roombus: cannot start: %s", exc)
        return 1
    except Exception as exc:
        log.error("roombus: stopped by an error: %s", exc, exc_info=True)
        return 1
    finally:
        if health is not None:
            await health.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        del main
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    if args.command == "check":
        print(
            f"{args.config}: valid ({len(config.connectors)} connectors, "
            f"{len(config.mqtt)} MQTT brokers, {len(config.kafka)} Kafka clusters)"
        )
        return 0
    setup_logging(args.log_level, args.log_format)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_bridge(config))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop: libuv's (uvloop: less CPU per message) unless ROOMBUS_LOOP=asyncio."""
    if os.environ.get("ROOMBUS_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
