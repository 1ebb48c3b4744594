"""The `roombus` command line (the wiring itself is `bridge.app`'s).

    roombus run CONFIG      run the bridge until SIGTERM/SIGINT (first: drain; second: force);
                            SIGHUP reloads CONFIG, and so does every change with --watch
    roombus check CONFIG    validate the file completely; exit 78 when it is invalid, else
                            print a summary: rooms, buses, routes by direction
    roombus routes CONFIG   which routes a sample MQTT topic, Kafka record or room event
                            takes, and what they render (nothing connects)
    roombus schema          print the JSON Schema of the configuration

`--log-level` and `--log-format` go before or after the subcommand. Nothing printed ever holds
a secret of the configuration (`Config.secrets()`); logs are redacted by `bridge.logs`.

Exit codes: 0 clean stop (also when the reader of stdout went away: `roombus schema | head`);
1 runtime failure; 2 usage; 78 invalid configuration (EX_CONFIG); 130/143 forced by a second
signal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

from bridge import __version__
from bridge.app import build_bridge
from bridge.config import (
    ROOM_KINDS,
    Config,
    ConfigError,
    json_schema,
    load_config,
    redact_all,
)
from bridge.errors import ConnectorError
from bridge.explain import explain_routes, summary
from bridge.health import HealthServer
from bridge.logs import LEVELS, RedactingFilter, setup_logging
from bridge.runtime.reloader import Reloader

log = logging.getLogger("roombus")

EX_CONFIG = 78


def _global_options(level: str, fmt: str) -> argparse.ArgumentParser:
    """A parent parser with the options that go before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=level,
        choices=list(LEVELS),
        help="log level (default: info, or $ROOMBUS_LOG_LEVEL); trace also shows the"
        " libraries' debug logs; $ROOMBUS_LOG_LEVELS sets single loggers: aiortc=debug,...",
    )
    common.add_argument(
        "--log-format",
        default=fmt,
        choices=["text", "json"],
        help="text for people, json (one object per line) for containers",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `roombus`."""
    # The top level has the defaults; the subcommands' copies default to SUPPRESS so that an
    # option given before the subcommand is not reset by the subcommand's parser. (Two parent
    # parsers, because parsers given the same parent share its action objects and defaults.)
    parser = argparse.ArgumentParser(
        prog="roombus",
        description="Bridge LiveKit rooms to Kafka and MQTT.",
        parents=[
            _global_options(
                os.environ.get("ROOMBUS_LOG_LEVEL", "info"),
                os.environ.get("ROOMBUS_LOG_FORMAT", "text"),
            )
        ],
    )
    common = _global_options(argparse.SUPPRESS, argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"roombus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the bridge", parents=[common])
    run.add_argument("config", help="configuration file (YAML)")
    run.add_argument(
        "--watch", action="store_true", help="reload the configuration when the file changes"
    )
    check = sub.add_parser("check", help="validate a configuration file", parents=[common])
    check.add_argument("config", help="configuration file (YAML)")
    sub.add_parser("schema", help="print the configuration's JSON Schema", parents=[common])
    routes = sub.add_parser(
        "routes",
        help="show which routes a sample message takes (nothing connects)",
        description="Which routes a sample bus message (--topic) or room event (--event)"
        " would take, and what they would render.",
        parents=[common],
    )
    routes.add_argument("config", help="configuration file (YAML)")
    routes.add_argument("--topic", help="a bus message's MQTT or Kafka topic; an event's topic")
    routes.add_argument(
        "--event", choices=ROOM_KINDS, help="a room event of this kind instead of a bus message"
    )
    bus = routes.add_mutually_exclusive_group()
    bus.add_argument("--mqtt", metavar="BROKER", help="only routes from this MQTT broker")
    bus.add_argument("--kafka", metavar="CLUSTER", help="only routes from this Kafka cluster")
    routes.add_argument("--payload", default="", help="the payload (UTF-8 text)")
    routes.add_argument("--key", help="Kafka record key; attribute key of an event")
    routes.add_argument("--partition", type=int, default=0, help="Kafka partition (default 0)")
    routes.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Kafka header or MQTT 5 user property (repeatable)",
    )
    routes.add_argument("--response-topic", help="MQTT 5 response topic (RPC requests)")
    routes.add_argument("--room", default="room", help="the event's room")
    routes.add_argument("--participant", default="participant", help="the event's sender")
    routes.add_argument(
        "--value",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other placeholder value of the event (event=left, method=..., stream_id=...)",
    )
    return parser


async def run_bridge(
    config: Config,
    path: str | None = None,
    *,
    watch: bool = False,
    on_load: Callable[[Config], None] | None = None,
) -> int:
    """Run until a signal; the first drains, the second forces.

    With `path` (the file `config` came from), SIGHUP reloads it, and so does every change of
    the file with `watch` (`bridge.runtime.reloader`); `on_load` sees every configuration
    read from it, valid, before it is applied.
    """
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
        address = http_address(config, os.environ)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("roombus: %s", problem)
        return EX_CONFIG
    reloader = Reloader(bridge, path, on_load=on_load) if path is not None else None
    health = HealthServer(bridge, address[1], address[0]) if address else None
    triggers: list[asyncio.Task[None]] = []
    try:
        if health is not None:
            await health.start()
        if reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, reloader.trigger)
            triggers.append(asyncio.create_task(reloader.run(), name="roombus[reload]"))
            if watch:
                triggers.append(asyncio.create_task(reloader.watch(), name="roombus[watch]"))
        await bridge.run(stop)
    except ConnectorError as exc:
        log.error("roombus: cannot start: %s", exc)
        return 1
    except Exception as exc:
        log.error("roombus: stopped by an error: %s", exc, exc_info=True)
        return 1
    finally:
        for task in triggers:
            task.cancel()
        await asyncio.gather(*triggers, return_exceptions=True)
        if health is not None:
            await health.stop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        del main
    return 0


def http_address(config: Config, environ: Mapping[str, str]) -> tuple[str, int] | None:
    """Where the HTTP port listens (host, port), or None for no HTTP port.

    The config's ``bridge.http_port``/``http_host``, else ``$ROOMBUS_HTTP_PORT`` and
    ``$ROOMBUS_HTTP_HOST`` (the container image sets 8081, so that its HEALTHCHECK holds
    whatever configuration is mounted).

    Raises:
        ConfigError: ``$ROOMBUS_HTTP_PORT`` is not a port number.
    """
    settings = config.bridge
    host = settings.http_host
    if "http_host" not in settings.model_fields_set:
        host = environ.get("ROOMBUS_HTTP_HOST") or host
    if settings.http_port is not None:
        return host, settings.http_port
    text = environ.get("ROOMBUS_HTTP_PORT", "").strip()
    if not text:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError([f"$ROOMBUS_HTTP_PORT: {text!r} is not a port number (1-65535)"])
    return host, int(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`roombus schema | head -1`): what it wanted it got. Point stdout
        # at devnull so the interpreter's last flush fails no more (Python docs, "Note on
        # SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in LEVELS:
        parser.error(f"log level {args.log_level!r}: choose from {', '.join(LEVELS)}")
    if args.command == "routes" and args.event is None and args.topic is None:
        parser.error("routes: give --topic (a bus message) or --event (a room event)")
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    # Logging is set up before the file is read (its warnings, e.g. a deprecated key, are
    # formatted like every other line), and again with the file's secrets once it is read.
    try:
        setup_logging(args.log_level, args.log_format)
    except ValueError as exc:  # a malformed $ROOMBUS_LOG_LEVELS
        parser.error(str(exc))
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    secrets = config.secrets()
    handler = setup_logging(args.log_level, args.log_format, secrets)
    if args.command == "check":
        _print_redacted(summary(config, args.config), secrets)
        return 0
    if args.command == "routes":
        _print_redacted(explain_routes(config, args), secrets)
        return 0
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        redacting = next(f for f in handler.filters if isinstance(f, RedactingFilter))
        return runner.run(
            run_bridge(
                config,
                args.config,
                watch=args.watch,
                on_load=lambda new: redacting.add(new.secrets()),
            )
        )


def _print_redacted(lines: Iterator[str], secrets: frozenset[str]) -> None:
    print("\n".join(redact_all(list(lines), secrets)))


# ----------------------------------------------------------------------------- check summary


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
