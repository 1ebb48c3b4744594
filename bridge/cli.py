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
from collections.abc import Sequence

from bridge import __version__
from bridge.config import (
    Config,
    ConfigError,
    KafkaFrom,
    KafkaTo,
    MqttFrom,
    MqttTo,
    json_schema,
    load_config,
)
from bridge.health import HealthServer
from bridge.runtime import Bridge, Buses

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


def build_buses(config: Config) -> Buses:
    """The bus connectors the configuration uses (only those)."""
    from connectors.kafka import KafkaSettings, KafkaSink, KafkaSource
    from connectors.mqtt import MqttConnector, MqttSettings

    buses = Buses()
    used_mqtt: set[str] = set()
    used_kafka_sinks: set[str] = set()
    for connector in config.connectors:
        for end in (connector.from_, connector.to, connector.dead_letter):
            if isinstance(end, (MqttFrom, MqttTo)):
                used_mqtt.add(end.mqtt)
            if isinstance(end, KafkaTo):
                used_kafka_sinks.add(end.kafka)
    for name in sorted(used_mqtt):
        broker = config.mqtt[name]
        tls = broker.tls
        buses.mqtt[name] = MqttConnector(
            f"mqtt:{name}",
            MqttSettings(
                host=broker.host,
                port=broker.port,
                client_id=broker.client_id or f"roombus-{name}",
                protocol=broker.protocol,
                username=broker.username,
                password=broker.password,
                tls=tls is not None,
                ca_file=tls.ca_file if tls else None,
                cert_file=tls.cert_file if tls else None,
                key_file=tls.key_file if tls else None,
                tls_insecure=tls.insecure if tls else False,
                keepalive=broker.keepalive,
                clean_start=broker.clean_start,
                session_expiry=broker.session_expiry,
                max_inflight=broker.max_inflight,
            ),
        )

    def kafka_settings(name: str) -> KafkaSettings:
        cluster = config.kafka[name]
        tls, sasl = cluster.tls, cluster.sasl
        if sasl is not None:
            protocol = "SASL_SSL" if tls is not None else "SASL_PLAINTEXT"
        else:
            protocol = "SSL" if tls is not None else "PLAINTEXT"
        return KafkaSettings(
            bootstrap_servers=cluster.bootstrap_servers,
            client_id=cluster.client_id,
            security_protocol=protocol,  # type: ignore[arg-type]
            sasl_mechanism=sasl.mechanism if sasl else None,
            username=sasl.username if sasl else None,
            password=sasl.password if sasl else None,
            ca_file=tls.ca_file if tls else None,
            cert_file=tls.cert_file if tls else None,
            key_file=tls.key_file if tls else None,
            acks=cluster.acks,
            enable_idempotence=cluster.acks == "all",
            compression=cluster.compression,
            max_request_size=cluster.max_request_size,
        )

    for name in sorted(used_kafka_sinks):
        buses.kafka_sinks[name] = KafkaSink(f"kafka:{name}", kafka_settings(name))
    for connector in config.connectors:
        source = connector.from_
        if isinstance(source, KafkaFrom):
            # One group per route by default: routes never rebalance each other.
            group = source.group_id or f"{config.kafka[source.kafka].group_id}.{connector.name}"
            buses.kafka_sources[connector.name] = KafkaSource(
                f"kafka:{source.kafka}:{connector.name}",
                kafka_settings(source.kafka),
                source.topics,
                group,
                max_in_flight=source.max_in_flight,
            )
    return buses


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
    bridge = Bridge(config, build_buses(config))
    health = HealthServer(bridge, config.bridge.health_port) if config.bridge.health_port else None
    try:
        if health is not None:
            await health.start()
        await bridge.run(stop)
    except Exception as exc:
        log.error("roombus: stopped by an error: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
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
    return asyncio.run(run_bridge(config))
