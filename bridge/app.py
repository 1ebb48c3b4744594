"""The composition root: config → endpoints → `Bridge`; the only module importing connectors/.

Per MQTT broker the bridge opens up to two connections: one that subscribes (the persistent
session of ``client_id``: what the routes and RPC replies read) and one that only publishes
(``<client_id>-pub``, clean session), so that publishing never waits behind the inbound
backlog of the same broker — a broker answers a subscriber's own PUBLISHes only after the
messages it queued for it. Per Kafka cluster one producer; per bus-to-room Kafka route one
consumer group; per cluster with room-to-bus RPC one group-less reply reader.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bridge.config import (
    Config,
    ConfigError,
    KafkaFrom,
    KafkaTo,
    MqttBrokerConfig,
    MqttFrom,
    MqttTo,
    RoomFrom,
)
from bridge.endpoint import Sink
from bridge.envelope import Outbound
from bridge.router import ToRoomRoute, compile_routes
from bridge.runtime.bridge import Bridge, BusSource, Endpoints, Spooling
from bridge.runtime.outbox import DurableQueue
from bridge.runtime.ownership import replica_name
from bridge.topics import parse_filter
from connectors.kafka import KafkaSettings, KafkaSink, KafkaSource
from connectors.kafka_group import KafkaMembership
from connectors.kafka_replies import KafkaReplySource
from connectors.mqtt import MqttConnector, MqttSettings

log = logging.getLogger("roombus")


def mqtt_settings(name: str, broker: MqttBrokerConfig, replica: str = "") -> MqttSettings:
    """The connector settings of broker `name` (its subscribing connection).

    A replica (`bridge.replicas`) suffixes the client id with its name: replicas of one
    configuration would otherwise take each other's session over.
    """
    tls = broker.tls
    client_id = broker.client_id or f"roombus-{name}"
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        client_id=f"{client_id}-{replica}" if replica else client_id,
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
    )


def kafka_settings(config: Config, name: str) -> KafkaSettings:
    """The connector settings of Kafka cluster `name`."""
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


def build_endpoints(config: Config) -> Endpoints:
    """Every endpoint the configuration uses, and only those."""
    routes = compile_routes(config)
    to_room = [r for r in routes if isinstance(r, ToRoomRoute)]
    publish_mqtt: set[str] = set()
    publish_kafka: set[str] = set()
    subscriptions: dict[str, dict[str, int]] = {}
    kafka_replies: dict[str, set[str]] = {}
    replicas = config.bridge.replicas
    replica = replica_name(replicas.replica_id) if replicas is not None else ""
    for connector in config.connectors:
        for end in (connector.to, connector.dead_letter):
            if isinstance(end, MqttTo):
                publish_mqtt.add(end.mqtt)
            elif isinstance(end, KafkaTo):
                publish_kafka.add(end.kafka)
        source = connector.from_
        if isinstance(source, MqttFrom):
            filters = subscriptions.setdefault(source.mqtt, {})
            if replicas is None:
                filters[parse_filter(source.topic).mqtt_filter] = source.qos
            # else: each owner subscribes to the topics of its rooms (Bridge._acquire)
            if source.reply is not None or _is_rpc(connector.to):
                publish_mqtt.add(source.mqtt)  # replies
        elif isinstance(source, KafkaFrom) and _is_rpc(connector.to):
            publish_kafka.add(source.kafka)  # replies
        elif isinstance(source, RoomFrom) and source.rpc is not None:
            if isinstance(connector.to, MqttTo):
                subscriptions.setdefault(connector.to.mqtt, {})[source.rpc.reply_topic] = 1
            elif isinstance(connector.to, KafkaTo):
                kafka_replies.setdefault(connector.to.kafka, set()).add(source.rpc.reply_topic)

    endpoints = Endpoints()
    for name in sorted(publish_mqtt):
        settings = mqtt_settings(name, config.mqtt[name], replica).for_publishing(f"mqtt:{name}")
        sink: Sink[Outbound] = MqttConnector(f"mqtt:{name}:pub", settings)
        endpoints.sinks[f"mqtt:{name}"] = sink
    for name in sorted(publish_kafka):
        endpoints.sinks[f"kafka:{name}"] = KafkaSink(f"kafka:{name}", kafka_settings(config, name))
    for name, filters in sorted(subscriptions.items()):
        subscriber = MqttConnector(f"mqtt:{name}", mqtt_settings(name, config.mqtt[name], replica))
        for topic_filter, qos in filters.items():
            subscriber.add_subscription(topic_filter, qos)
        mine = tuple(r for r in to_room if isinstance(r.source, MqttFrom) and r.source.mqtt == name)
        endpoints.sources.append(
            BusSource(f"mqtt:{name}", f"mqtt:{name}", subscriber, mine, filters)
        )
    for route in to_room:
        source = route.source
        if not isinstance(source, KafkaFrom):
            continue
        # One group per route by default: routes never rebalance each other.
        group = source.group_id or f"{config.kafka[source.kafka].group_id}.{route.name}"
        consumer = KafkaSource(
            f"kafka:{source.kafka}:{route.name}",
            kafka_settings(config, source.kafka),
            source.topics,
            group,
            max_in_flight=source.max_in_flight,
            auto_offset_reset=source.auto_offset_reset,
        )
        endpoints.sources.append(
            BusSource(consumer.name, f"kafka:{source.kafka}", consumer, (route,))
        )
    for name, topics in sorted(kafka_replies.items()):
        replies = KafkaReplySource(
            f"kafka:{name}:rpc-replies", kafka_settings(config, name), sorted(topics)
        )
        endpoints.sources.append(BusSource(replies.name, f"kafka:{name}", replies))
    return endpoints


def _is_rpc(end: object) -> bool:
    return getattr(end, "kind", None) == "rpc"


def build_spooling(config: Config) -> Spooling | None:
    """The room-to-bus spool, if configured."""
    spool = config.bridge.spool
    if spool is None:
        return None
    directory = spool.directory or config.bridge.state_dir
    if directory is None:
        raise ConfigError(["bridge.spool: needs spool.directory or bridge.state_dir"])
    from bridge.spool import Spool, SpoolCodec

    opened = Spool.open(
        Path(directory) / "spool.sqlite3", max_bytes=spool.max_bytes, max_age=spool.max_age
    )
    # Every route opens before anything is appended (each gets its share of max_bytes).
    routes = {
        c.name: opened.route(c.name, config.bridge.overflow)
        for c in config.connectors
        if isinstance(c.from_, RoomFrom) and c.from_.rpc is None
    }

    def route(name: str, overflow: str) -> DurableQueue:
        # A route a reload adds opens then; a changed one keeps its spool (and what it holds).
        if name not in routes:
            routes[name] = opened.route(name, overflow)
        return routes[name]

    for name, count in opened.stale_routes().items():
        log.warning(
            "spool: %d messages of route %r, which the configuration no longer has, are kept in %s",
            count,
            name,
            directory,
        )
    return Spooling(
        route=route,
        codec=SpoolCodec(),
        expire=opened.expire,
        close=opened.close,
    )


def build_membership(config: Config) -> KafkaMembership | None:
    """The replica's group membership (`bridge.replicas`), or None for a single process."""
    replicas = config.bridge.replicas
    if replicas is None:
        return None
    cluster = config.kafka[replicas.kafka]
    return KafkaMembership(
        f"kafka:{replicas.kafka}:replicas",
        kafka_settings(config, replicas.kafka),
        group_id=replicas.group_id or f"{cluster.group_id}.replicas",
        topic=replicas.control_topic,
        partitions=replicas.partitions,
        replication_factor=replicas.replication_factor,
        session_timeout=replicas.session_timeout,
        heartbeat_interval=replicas.heartbeat_interval,
        instance=replica_name(replicas.replica_id),
    )


def build_bridge(config: Config) -> Bridge:
    """The bridge for `config`, with its endpoints (nothing connects before `Bridge.run`)."""
    return Bridge(
        config,
        build_endpoints(config),
        spooling=build_spooling(config),
        plan_endpoints=build_endpoints,
        membership=build_membership(config),
    )
