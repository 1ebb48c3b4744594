"""The Bridge: owns the rooms, the bus connections and every route task, and shuts down cleanly.

Room to bus: each joined room (`RoomLink`) turns its events — packets, streams, attribute and
metadata changes, presence — into `RoomMessage`s and offers them to every `ToBusRoute` that
wants them. A route has a bounded queue (overflow policy from the config, drops counted) and one
worker that publishes in order and retries until the sink accepted the message (Kafka ack, MQTT
PUBACK); LiveKit cannot redeliver, so from the moment a message is queued the bridge owns it.

Bus to room: one reader per MQTT broker and per Kafka route takes messages in source order,
delivers each into its room and only then acknowledges it (MQTT PUBACK, Kafka offset commit).
A message that cannot be delivered (bad payload, value that would break a template, room not
joined, refused by LiveKit) goes to the route's dead-letter destination and is then acknowledged;
without one it is counted and left unacknowledged, so the bus keeps it.

Loop guard: everything the bridge publishes carries the ``roombus-source`` header (MQTT 5 user
property, Kafka header) with this bridge's id; messages carrying it are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from bridge.config import Config, MqttFrom
from bridge.endpoint import Inbound
from bridge.envelope import (
    H_CONTENT_TYPE,
    H_KIND,
    H_PARTICIPANT,
    H_PARTICIPANT_SID,
    H_ROOM,
    H_ROOM_SID,
    H_SOURCE,
    H_STREAM_ID,
    H_TIMESTAMP,
    H_TOPIC,
    Envelope,
    Outbound,
)
from bridge.errors import RejectedMessage
from bridge.room.errors import (
    ConnectError,
    DataPacketTooLargeError,
    NotConnectedError,
    RoomError,
    StateUpdateError,
)
from bridge.room.events import DataReceived, Disconnected
from bridge.room.room import Room, RoomOptions
from bridge.room.server_api import ServerApi, mint_token
from bridge.room.state import (
    ParticipantAttributesChanged,
    ParticipantConnected,
    ParticipantDisconnected,
    ParticipantMetadataChanged,
    RoomMetadataChanged,
)
from bridge.room.streams import ByteStreamReader, TextStreamReader
from bridge.room.types import Counters, DataPacketKind
from bridge.router import (
    BusTarget,
    RoomDelivery,
    RoomMessage,
    ToBusRoute,
    ToRoomRoute,
    compile_routes,
)
from bridge.rpcbridge import RpcBridge
from bridge.topics import glob_match

log = logging.getLogger("roombus.bridge")

# Largest text a "whole" text-stream route buffers before giving up on that stream.
MAX_WHOLE_TEXT_BYTES = 16 * 1024 * 1024
# Retry of a failed publish or delivery: exponential, capped, jittered by the connectors.
RETRY_INITIAL = 0.2
RETRY_MAX = 10.0


class BusSink(Protocol):
    """What the runtime needs of an MQTT connector or Kafka sink."""

    name: str

    async def publish(self, message: Outbound) -> None:
        """Publish; return once accepted."""
        ...


class BusSource(Protocol):
    """What the runtime needs of an MQTT connector or Kafka source."""

    name: str

    def messages(self) -> Any:
        """Async iterator of `Inbound`."""
        ...


class Lifecycle(Protocol):
    """Start/stop of a connector."""

    async def start(self) -> None:
        """Connect."""
        ...

    async def stop(self) -> None:
        """Disconnect."""
        ...


@dataclass
class Buses:
    """The bus connections the runtime uses, built by the composition root (cli.py)."""

    mqtt: dict[str, Any] = field(default_factory=dict)  # name -> MqttConnector (source + sink)
    kafka_sinks: dict[str, Any] = field(default_factory=dict)  # name -> KafkaSink
    # route name -> KafkaSource (built per bus-to-room route: its own topics and group)
    kafka_sources: dict[str, Any] = field(default_factory=dict)

    def sink(self, target: BusTarget) -> BusSink:
        """The sink for a bus target."""
        sink: BusSink = (self.mqtt if target.bus == "mqtt" else self.kafka_sinks)[target.name]
        return sink

    def all(self) -> list[Lifecycle]:
        """Every connector, once."""
        return [*self.mqtt.values(), *self.kafka_sinks.values(), *self.kafka_sources.values()]


def _backoff(attempt: int) -> float:
    return float(min(RETRY_MAX, RETRY_INITIAL * 2 ** min(attempt, 10)))


class RouteWorker:
    """One room-to-bus route: a bounded queue and a worker publishing in order."""

    def __init__(self, bridge: Bridge, route: ToBusRoute) -> None:
        self.bridge = bridge
        self.route = route
        settings = bridge.config.bridge
        self.queue: asyncio.Queue[RoomMessage] = asyncio.Queue(settings.queue_size)
        self.overflow = settings.overflow
        self.c = bridge.counters
        self.prefix = f"route.{route.name}"

    async def offer(self, message: RoomMessage) -> None:
        """Queue `message` according to the overflow policy."""
        if self.overflow == "block":
            await self.queue.put(message)
            return
        if self.queue.full():
            if self.overflow == "drop_newest":
                self.c.inc(f"{self.prefix}.dropped_overflow")
                log.warning(
                    "%s: queue full (%d): dropped a message", self.route.name, self.queue.maxsize
                )
                return
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.queue.task_done()
                self.c.inc(f"{self.prefix}.dropped_overflow")
                log.warning("%s: queue full: dropped the oldest message", self.route.name)
        self.queue.put_nowait(message)

    async def run(self) -> None:
        """Publish queued messages in order until cancelled."""
        while True:
            message = await self.queue.get()
            try:
                await self._publish(message)
            finally:
                self.queue.task_done()

    async def _publish(self, message: RoomMessage) -> None:
        route = self.route
        try:
            out = route.target.outbound(
                message.payload,
                route.values(message),
                message.headers,
                content_type=message.content_type,
                default_key=message.default_key,
                bridge_id=self.bridge.bridge_id,
            )
        except RejectedMessage as exc:
            self.c.inc(f"{self.prefix}.rejected.{exc.reason}")
            log.warning("%s: rejected a %s message: %s", route.name, message.kind, exc.detail)
            if route.dead_letter is not None:
                await self.bridge.dead_letter(route.name, route.dead_letter, message, exc)
            return
        await self.bridge.publish_with_retry(route.name, route.target, out)
        self.c.inc(f"{self.prefix}.published")


class RoomLink:
    """One joined room: its `Room`, the routes listening to it, rejoin on loss."""

    def __init__(self, bridge: Bridge, name: str) -> None:
        self.bridge = bridge
        self.name = name
        self.room: Room | None = None
        self.connected = asyncio.Event()
        self.routes = [w for w in bridge.workers if w.route.wants_room(name)]
        # (participant identity) -> attribute keys published, to clear them on leave.
        self.published_attributes: dict[str, set[str]] = {}
        self.stopping = False

    def _token(self) -> str:
        lk = self.bridge.config.livekit
        if lk.token is not None:
            return lk.token
        assert lk.api_key is not None and lk.api_secret is not None
        return mint_token(
            lk.api_key,
            lk.api_secret,
            identity=lk.identity,
            room=self.name,
            name=lk.name,
            metadata=lk.metadata,
            attributes=lk.attributes,
            ttl=timedelta(seconds=lk.token_ttl),
        )

    async def run(self) -> None:
        """Join, and rejoin with backoff whenever the room is lost, until stopped."""
        attempt = 0
        while not self.stopping:
            room = Room(RoomOptions())
            self._attach(room)
            try:
                await room.connect(self.bridge.config.livekit.url, self._token())
            except ConnectError as exc:
                delay = _backoff(attempt)
                attempt += 1
                self.bridge.counters.inc("rooms.join_failed")
                # A rejected token or a missing room needs someone to act: say so loudly, but keep
                # trying (credentials get rotated, rooms get created).
                level = logging.WARNING if exc.retriable else logging.ERROR
                log.log(
                    level, "room %s: join failed (%s); retrying in %.1f s", self.name, exc, delay
                )
                await room.disconnect()
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self.room = room
            self.connected.set()
            log.info("room %s: joined as %s", self.name, room.local_participant.identity)
            await self._announce_initial_state(room)
            await room.wait_closed()
            self.connected.clear()
            self.room = None
            if not self.stopping:
                self.bridge.counters.inc("rooms.lost")
                log.warning("room %s: lost; rejoining", self.name)
                await asyncio.sleep(_backoff(0))

    async def stop(self) -> None:
        """Leave the room for good."""
        self.stopping = True
        if self.room is not None:
            await self.room.disconnect("bridge stopping")

    async def ready(self) -> Room:
        """The connected room (waits while it is rejoining)."""
        while True:
            await self.connected.wait()
            room = self.room
            if room is not None and room.isconnected:
                return room
            await asyncio.sleep(0.05)

    # ---------------------------------------------------------- room to bus

    def _attach(self, room: Room) -> None:
        kinds = {w.route.kind for w in self.routes}
        if "packet" in kinds:
            room.on(DataReceived, self._on_data)
        if "text_stream" in kinds:
            room.set_fallback_text_stream_handler(self._on_text_stream)
        if "byte_stream" in kinds:
            room.set_fallback_byte_stream_handler(self._on_byte_stream)
        if kinds & {"attributes", "presence"}:
            room.on(ParticipantAttributesChanged, self._on_attributes)
            room.on(ParticipantConnected, self._on_joined)
            room.on(ParticipantDisconnected, self._on_left)
        if "metadata" in kinds:
            room.on(ParticipantMetadataChanged, self._on_metadata)
        if "room_metadata" in kinds:
            room.on(RoomMetadataChanged, self._on_room_metadata)
        self.bridge.rpc.attach(self, room)
        room.on(Disconnected, lambda e: log.info("room %s: closed: %s", self.name, e.reason))

    def _values(self, room: Room, identity: str, sid: str, kind: str) -> dict[str, str]:
        return {
            "room": self.name,
            "room_sid": room.sid,
            "participant": identity,
            "participant_sid": sid,
            "kind": kind,
        }

    def _headers(self, values: Mapping[str, str], topic: str | None = None) -> dict[str, str]:
        headers = {
            H_ROOM: values["room"],
            H_ROOM_SID: values.get("room_sid", ""),
            H_KIND: values["kind"],
            H_TIMESTAMP: str(int(time.time() * 1000)),
        }
        if values.get("participant"):
            headers[H_PARTICIPANT] = values["participant"]
            headers[H_PARTICIPANT_SID] = values.get("participant_sid", "")
        if topic:
            headers[H_TOPIC] = topic
        return headers

    async def _offer(self, message: RoomMessage) -> None:
        for worker in self.routes:
            if worker.route.kind == message.kind and worker.route.wants(message):
                await worker.offer(message)

    async def _on_data(self, event: DataReceived) -> None:
        packet = event.packet
        room = self.room
        if room is None:
            return
        reliability = "reliable" if packet.kind == DataPacketKind.KIND_RELIABLE else "lossy"
        values = self._values(
            room, packet.participant_identity, packet.participant_sid, f"packet-{reliability}"
        )
        values["topic"] = packet.topic or ""
        await self._offer(
            RoomMessage(
                kind="packet",
                payload=packet.data,
                values=values,
                headers=self._headers(values, packet.topic),
            )
        )

    def _sender_sid(self, identity: str) -> str:
        room = self.room
        if room is None:
            return ""
        info = room.participant_info(identity)
        return info.sid if info else ""

    async def _on_text_stream(self, reader: TextStreamReader, identity: str) -> None:
        room = self.room
        if room is None:
            return
        info = reader.info
        values = self._values(room, identity, self._sender_sid(identity), "text-stream")
        values.update(topic=info.topic, stream_id=info.stream_id)
        probe = RoomMessage("text_stream", b"", values, {})
        routes = [w for w in self.routes if w.route.kind == "text_stream" and w.route.wants(probe)]
        if not routes:
            return
        base = self._headers(values, info.topic) | {H_STREAM_ID: info.stream_id}
        base |= {f"lk-attr-{k}": v for k, v in info.attributes.items()}
        incremental = [w for w in routes if w.route.source.text_stream.mode == "incremental"]  # type: ignore[union-attr]
        whole = [w for w in routes if w not in incremental]
        parts: list[str] = []
        size = 0
        index = 0
        try:
            async for piece in reader:
                for worker in incremental:
                    headers = base | {"lk-chunk-index": str(index), "lk-final": "false"}
                    await worker.offer(
                        RoomMessage(
                            "text_stream",
                            piece.encode(),
                            values,
                            headers,
                            "text/plain; charset=utf-8",
                            info.stream_id,
                        )
                    )
                index += 1
                if whole:
                    size += len(piece.encode())
                    if size > MAX_WHOLE_TEXT_BYTES:
                        self.bridge.counters.inc("rooms.text_stream_too_large")
                        log.warning(
                            "room %s: text stream %s over %d bytes: not forwarded whole",
                            self.name,
                            info.stream_id,
                            MAX_WHOLE_TEXT_BYTES,
                        )
                        whole = []
                        parts = []
                    parts.append(piece)
        except RoomError as exc:
            self.bridge.counters.inc("rooms.stream_aborted")
            log.warning(
                "room %s: text stream %s from %s aborted: %s",
                self.name,
                info.stream_id,
                identity,
                exc,
            )
            return
        for worker in incremental:
            headers = base | {"lk-chunk-index": str(index), "lk-final": "true"}
            await worker.offer(
                RoomMessage(
                    "text_stream", b"", values, headers, "text/plain; charset=utf-8", info.stream_id
                )
            )
        text = "".join(parts).encode()
        for worker in whole:
            await worker.offer(
                RoomMessage("text_stream", text, values, base, "text/plain; charset=utf-8")
            )

    async def _on_byte_stream(self, reader: ByteStreamReader, identity: str) -> None:
        room = self.room
        if room is None:
            return
        info = reader.info
        values = self._values(room, identity, self._sender_sid(identity), "byte-stream")
        values.update(
            topic=info.topic, stream_id=info.stream_id, name=info.name, mime_type=info.mime_type
        )
        probe = RoomMessage("byte_stream", b"", values, {})
        routes = [w for w in self.routes if w.route.kind == "byte_stream" and w.route.wants(probe)]
        if not routes:
            return
        base = self._headers(values, info.topic) | {
            H_STREAM_ID: info.stream_id,
            "lk-stream-name": info.name,
        }
        if info.total_size is not None:
            base["lk-stream-size"] = str(info.total_size)
        base |= {f"lk-attr-{k}": v for k, v in info.attributes.items()}
        await ByteStreamFanout(self, routes, values, base, info.mime_type, info.stream_id).run(
            reader, info.total_size
        )

    async def _on_attributes(self, event: ParticipantAttributesChanged) -> None:
        room = self.room
        if room is None or event.is_local:
            return
        values0 = self._values(room, event.identity, self._sender_sid(event.identity), "attributes")
        keys = self.published_attributes.setdefault(event.identity, set())
        for key, value in event.changed.items():
            values = values0 | {"key": key}
            payload = value.encode() if value != "" else None
            if payload is None:
                keys.discard(key)
            else:
                keys.add(key)
            await self._offer(
                RoomMessage(
                    "attributes",
                    payload,
                    values,
                    self._headers(values) | {"lk-attribute": key},
                    "text/plain; charset=utf-8",
                    f"{self.name}/{event.identity}/{key}",
                )
            )

    def _presence(
        self, identity: str, sid: str, name: str, event: str
    ) -> tuple[dict[str, str], bytes]:
        assert self.room is not None
        values = self._values(self.room, identity, sid, "presence") | {"event": event}
        body = json.dumps(
            {"event": event, "identity": identity, "sid": sid, "name": name, "room": self.name}
        ).encode()
        return values, body

    async def _on_joined(self, event: ParticipantConnected) -> None:
        if self.room is None:
            return
        info = event.info
        values, body = self._presence(info.identity, info.sid, info.name, "joined")
        await self._offer(
            RoomMessage(
                "presence",
                body,
                values,
                self._headers(values),
                "application/json",
                f"{self.name}/{info.identity}",
            )
        )
        changed = dict(info.attributes)
        if changed:
            await self._on_attributes(
                ParticipantAttributesChanged(info.identity, changed, changed, False)
            )

    async def _on_left(self, event: ParticipantDisconnected) -> None:
        if self.room is None:
            return
        info = event.info
        values, body = self._presence(info.identity, info.sid, info.name, "left")
        key = f"{self.name}/{info.identity}"
        # A retained or compacted presence topic is cleared (payload None); others get the event.
        for worker in self.routes:
            if worker.route.kind != "presence":
                continue
            target = worker.route.target
            payload = None if (target.retain or target.bus == "kafka") else body
            message = RoomMessage(
                "presence", payload, values, self._headers(values), "application/json", key
            )
            if worker.route.wants(message):
                await worker.offer(message)
        # Clear the attribute state we published for this participant.
        keys = self.published_attributes.pop(info.identity, set())
        values0 = self._values(self.room, info.identity, info.sid, "attributes")
        for attr in sorted(keys):
            values = values0 | {"key": attr}
            await self._offer(
                RoomMessage(
                    "attributes",
                    None,
                    values,
                    self._headers(values) | {"lk-attribute": attr},
                    None,
                    f"{self.name}/{info.identity}/{attr}",
                )
            )

    async def _on_metadata(self, event: ParticipantMetadataChanged) -> None:
        if self.room is None or event.is_local:
            return
        values = self._values(
            self.room, event.identity, self._sender_sid(event.identity), "metadata"
        )
        await self._offer(
            RoomMessage(
                "metadata",
                event.new.encode(),
                values,
                self._headers(values),
                None,
                f"{self.name}/{event.identity}",
            )
        )

    async def _on_room_metadata(self, event: RoomMetadataChanged) -> None:
        if self.room is None:
            return
        values = self._values(self.room, "", "", "room-metadata")
        await self._offer(
            RoomMessage(
                "room_metadata", event.new.encode(), values, self._headers(values), None, self.name
            )
        )

    async def _announce_initial_state(self, room: Room) -> None:
        """Publish the state found at join: present participants, their attributes, metadata."""
        for identity, participant in room.remote_participants.items():
            info = room.participant_info(identity)
            if info is not None:
                await self._on_joined(ParticipantConnected(info))
            if participant.metadata:
                await self._on_metadata(
                    ParticipantMetadataChanged(identity, "", participant.metadata, False)
                )
        if room.metadata:
            await self._on_room_metadata(RoomMetadataChanged("", room.metadata))


class ByteStreamFanout:
    """A byte stream to one message per route, or ordered chunk messages above the limit."""

    def __init__(
        self,
        link: RoomLink,
        routes: list[RouteWorker],
        values: dict[str, str],
        headers: dict[str, str],
        content_type: str,
        stream_id: str,
    ) -> None:
        self.link = link
        self.routes = routes
        self.values = values
        self.headers = headers
        self.content_type = content_type
        self.stream_id = stream_id

    def _limit(self, worker: RouteWorker) -> int:
        return int(worker.route.source.byte_stream.max_message_bytes)  # type: ignore[union-attr]

    async def run(self, reader: ByteStreamReader, total: int | None) -> None:
        """Read the stream and offer its messages to the routes."""
        counters = self.link.bridge.counters
        # Routes that may get the stream as chunks, and the buffer of each (one chunk pending so
        # the last one can be marked final).
        buffers: dict[RouteWorker, bytearray] = {w: bytearray() for w in self.routes}
        pending: dict[RouteWorker, bytes | None] = dict.fromkeys(self.routes)
        index: dict[RouteWorker, int] = dict.fromkeys(self.routes, 0)
        live = list(self.routes)
        try:
            async for data in reader:
                for worker in list(live):
                    buf = buffers[worker]
                    buf += data
                    limit = self._limit(worker)
                    oversize = worker.route.source.byte_stream.oversize  # type: ignore[union-attr]
                    if len(buf) > limit and oversize == "reject":
                        counters.inc(f"{worker.prefix}.rejected.too_large")
                        log.warning(
                            "%s: byte stream %s over %d bytes: rejected",
                            worker.route.name,
                            self.stream_id,
                            limit,
                        )
                        live.remove(worker)
                        continue
                    if oversize == "chunk":
                        while len(buf) > limit:
                            chunk = bytes(buf[:limit])
                            del buf[:limit]
                            await self._flush_pending(worker, pending, index, final=False)
                            pending[worker] = chunk
        except RoomError as exc:
            counters.inc("rooms.stream_aborted")
            log.warning("room %s: byte stream %s aborted: %s", self.link.name, self.stream_id, exc)
            return
        for worker in live:
            buf = buffers[worker]
            if pending[worker] is None:
                # Fits in one message.
                await worker.offer(
                    RoomMessage(
                        "byte_stream",
                        bytes(buf),
                        self.values,
                        self.headers,
                        self.content_type,
                        self.stream_id,
                    )
                )
                continue
            if buf:
                await self._flush_pending(worker, pending, index, final=False)
                pending[worker] = bytes(buf)
            await self._flush_pending(worker, pending, index, final=True)

    async def _flush_pending(
        self,
        worker: RouteWorker,
        pending: dict[RouteWorker, bytes | None],
        index: dict[RouteWorker, int],
        *,
        final: bool,
    ) -> None:
        chunk = pending[worker]
        if chunk is None:
            return
        headers = self.headers | {
            "lk-chunk-index": str(index[worker]),
            "lk-final": "true" if final else "false",
        }
        index[worker] += 1
        pending[worker] = None
        await worker.offer(
            RoomMessage(
                "byte_stream", chunk, self.values, headers, self.content_type, self.stream_id
            )
        )


class Bridge:
    """The running bridge (see the module docstring)."""

    def __init__(self, config: Config, buses: Buses, *, bridge_id: str | None = None) -> None:
        self.config = config
        self.buses = buses
        self.bridge_id = bridge_id or f"{config.livekit.identity}-{uuid.uuid4().hex[:8]}"
        self.counters = Counters()
        routes = compile_routes(config)
        self.workers = [
            RouteWorker(self, r) for r in routes if isinstance(r, ToBusRoute) and r.kind != "rpc"
        ]
        self.room_routes = [r for r in routes if isinstance(r, ToRoomRoute)]
        self.rpc = RpcBridge(
            self,
            [r for r in self.room_routes if r.target.kind == "rpc"],
            [r for r in routes if isinstance(r, ToBusRoute) and r.kind == "rpc"],
        )
        self.links: dict[str, RoomLink] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._link_tasks: dict[str, asyncio.Task[None]] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._server_api: ServerApi | None = None
        self.ready = asyncio.Event()
        self._stopping = False

    # --------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain and shut down."""
        lk = self.config.livekit
        if lk.api_key and lk.api_secret:
            self._server_api = ServerApi(lk.url, lk.api_key, lk.api_secret)
        try:
            await self._start_buses()
            await self.rpc.start()
            for name in lk.rooms:
                self._join(name)
            if lk.room_patterns:
                self._spawn("room-discovery", self._discover_rooms())
            for worker in self.workers:
                self._spawn(f"route-{worker.route.name}", worker.run())
            self._start_readers()
            self.ready.set()
            log.info(
                "bridge %s: running: %d rooms, %d room-to-bus and %d bus-to-room routes",
                self.bridge_id,
                len(lk.rooms),
                len(self.workers),
                len(self.room_routes),
            )
            await stop.wait()
        finally:
            await self._shutdown()

    async def _start_buses(self) -> None:
        for route in self.room_routes:
            if isinstance(route.source, MqttFrom):
                assert route.filter is not None
                self.buses.mqtt[route.source.mqtt].add_subscription(
                    route.filter.mqtt_filter, route.source.qos
                )
        self.rpc.prepare_buses()
        for connector in self.buses.all():
            await connector.start()

    def _start_readers(self) -> None:
        by_broker: dict[str, list[ToRoomRoute]] = {}
        for route in self.room_routes:
            if isinstance(route.source, MqttFrom):
                by_broker.setdefault(route.source.mqtt, []).append(route)
            else:
                source = self.buses.kafka_sources[route.name]
                self._readers.append(
                    asyncio.create_task(self._read(source, [route]), name=f"read-{route.name}")
                )
        for broker in self.rpc.mqtt_reply_topics:
            by_broker.setdefault(broker, [])
        for broker, routes in by_broker.items():
            source = self.buses.mqtt[broker]
            self._readers.append(
                asyncio.create_task(self._read(source, routes), name=f"read-mqtt-{broker}")
            )

    def _join(self, name: str) -> None:
        if name in self.links:
            return
        link = RoomLink(self, name)
        self.links[name] = link
        task = asyncio.create_task(link.run(), name=f"room-{name}")
        self._link_tasks[name] = task
        task.add_done_callback(self._task_done)

    async def _discover_rooms(self) -> None:
        lk = self.config.livekit
        assert self._server_api is not None
        while True:
            try:
                rooms = await self._server_api.list_rooms()
                for room in rooms:
                    if any(glob_match(p, room.name) for p in lk.room_patterns):
                        self._join(room.name)
            except RoomError as exc:
                self.counters.inc("rooms.discovery_failed")
                log.warning("room discovery failed: %s", exc)
            await asyncio.sleep(lk.room_discovery_interval)

    async def _shutdown(self) -> None:
        self._stopping = True
        timeout = self.config.bridge.shutdown_timeout
        # 1. Stop taking bus messages (what is mid-delivery finishes or stays unacknowledged).
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        # Bus requests in progress get their replies (unanswered ones stay unacknowledged).
        await self.rpc.drain(timeout)
        # 2. Drain room-to-bus queues within the deadline.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for worker in self.workers:
                    await worker.queue.join()
        left = sum(w.queue.qsize() for w in self.workers)
        if left:
            self.counters.inc("shutdown.undelivered", left)
            log.error(
                "bridge: %d room-to-bus messages not delivered within %.0f s of shutdown",
                left,
                timeout,
            )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # 3. Leave the rooms (with `leave`, so peers see us go at once).
        await asyncio.gather(*(link.stop() for link in self.links.values()), return_exceptions=True)
        for task in self._link_tasks.values():
            task.cancel()
        await asyncio.gather(*self._link_tasks.values(), return_exceptions=True)
        await self.rpc.stop()
        # 4. Commit and disconnect the buses.
        for connector in self.buses.all():
            try:
                await connector.stop()
            except Exception:
                log.exception("bridge: stopping %s failed", getattr(connector, "name", connector))
        if self._server_api is not None:
            await self._server_api.aclose()
        log.info("bridge %s: stopped", self.bridge_id)

    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bridge: task %s failed", task.get_name(), exc_info=task.exception())

    # ---------------------------------------------------------- room to bus

    async def publish_with_retry(self, route: str, target: BusTarget, out: Outbound) -> None:
        """Publish until the sink accepts (the message is ours: LiveKit cannot resend it)."""
        sink = self.buses.sink(target)
        attempt = 0
        while True:
            try:
                await sink.publish(out)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any sink failure: keep the message, retry
                delay = _backoff(attempt)
                attempt += 1
                self.counters.inc(f"route.{route}.publish_retries")
                log.warning(
                    "%s: publish to %s %s failed (%s); retrying in %.1f s",
                    route,
                    target.bus,
                    out.topic,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def dead_letter(
        self, route: str, target: BusTarget, message: RoomMessage, why: RejectedMessage
    ) -> None:
        """Send a rejected room message to the route's dead-letter destination."""
        headers = dict(message.headers) | {
            "roombus-error": why.reason,
            "roombus-error-detail": why.detail[:500],
        }
        try:
            out = target.outbound(
                message.payload,
                message.values,
                headers,
                content_type=message.content_type,
                default_key=message.default_key,
                bridge_id=self.bridge_id,
            )
        except RejectedMessage as exc:
            self.counters.inc(f"route.{route}.dead_letter_failed")
            log.error("%s: cannot dead-letter either: %s", route, exc)
            return
        await self.publish_with_retry(route, target, out)
        self.counters.inc(f"route.{route}.dead_lettered")

    # ---------------------------------------------------------- bus to room

    async def _read(self, source: BusSource, routes: list[ToRoomRoute]) -> None:
        """Deliver a source's messages in order; acknowledge each once delivered."""
        async for inbound in source.messages():
            await self._handle_inbound(source.name, inbound, routes)

    async def _handle_inbound(
        self, source: str, inbound: Inbound[Envelope], routes: list[ToRoomRoute]
    ) -> None:
        envelope = inbound.message
        if envelope.headers.get(H_SOURCE) == self.bridge_id:
            self.counters.inc("loop.skipped")
            await inbound.ack()
            return
        if self.rpc.take_reply(source, envelope):
            await inbound.ack()
            return
        matched = False
        delivered = True
        rpc: list[tuple[ToRoomRoute, dict[str, str]]] = []
        for route in routes:
            values = route.match(envelope)
            if values is None:
                continue
            matched = True
            if route.target.kind == "rpc":
                rpc.append((route, values))
            elif not await self._deliver_or_dead_letter(route, envelope, values):
                delivered = False
        if not matched:
            self.counters.inc(f"source.{source}.unmatched")
        if rpc:
            # A request is answered once: by the first RPC route it matches. Its task
            # acknowledges it after the reply (and only if the other routes delivered it).
            if len(rpc) > 1:
                self.counters.inc(f"source.{source}.rpc_extra_routes", len(rpc) - 1)
            route, values = rpc[0]
            await self.rpc.submit(route, envelope, values, inbound, ack=delivered)
            return
        if delivered:
            await inbound.ack()

    async def _deliver_or_dead_letter(
        self, route: ToRoomRoute, envelope: Envelope, values: dict[str, str]
    ) -> bool:
        prefix = f"route.{route.name}"
        # The MQTT 5 expiry is the interval left when the broker sent it, from reception on.
        if envelope.expiry is not None and time.time() > envelope.received_at + envelope.expiry:
            self.counters.inc(f"{prefix}.expired")
            return True
        try:
            delivery = route.delivery(envelope, values)
            await self._deliver(route, delivery, envelope)
        except RejectedMessage as exc:
            self.counters.inc(f"{prefix}.rejected.{exc.reason}")
            log.warning("%s: rejected a message from %s: %s", route.name, envelope.topic, exc)
            if route.dead_letter is None:
                return False
            return await self.dead_letter_envelope(route, envelope, values, exc)
        self.counters.inc(f"{prefix}.delivered")
        return True

    async def dead_letter_envelope(
        self, route: ToRoomRoute, envelope: Envelope, values: dict[str, str], why: RejectedMessage
    ) -> bool:
        """Send a rejected bus message to the route's dead-letter destination; True if sent."""
        prefix = f"route.{route.name}"
        assert route.dead_letter is not None
        headers = dict(envelope.headers) | {
            "roombus-error": why.reason,
            "roombus-error-detail": why.detail[:500],
            "roombus-origin-topic": envelope.topic,
        }
        try:
            out = route.dead_letter.outbound(
                envelope.payload,
                values,
                headers,
                content_type=envelope.content_type,
                default_key=None,
                bridge_id=self.bridge_id,
            )
        except RejectedMessage as exc2:
            self.counters.inc(f"{prefix}.dead_letter_failed")
            log.error("%s: cannot dead-letter either: %s", route.name, exc2)
            return False
        await self.publish_with_retry(route.name, route.dead_letter, out)
        self.counters.inc(f"{prefix}.dead_lettered")
        return True

    async def _deliver(self, route: ToRoomRoute, d: RoomDelivery, envelope: Envelope) -> None:
        link = self.links.get(d.room)
        if link is None:
            raise RejectedMessage("unknown_room", f"room {d.room!r} is not one the bridge joins")
        attempt = 0
        while True:
            room = await link.ready()
            try:
                await self._deliver_once(room, d, envelope)
                return
            except NotConnectedError:
                pass  # the room is rejoining: wait for it and try again
            except StateUpdateError as exc:
                raise RejectedMessage("refused", str(exc)) from exc
            except RoomError as exc:
                if not exc.retriable:
                    raise RejectedMessage("refused", str(exc)) from exc
                log.warning("%s: delivery into %s failed (%s); retrying", route.name, d.room, exc)
            await asyncio.sleep(_backoff(attempt))
            attempt += 1

    async def _deliver_once(self, room: Room, d: RoomDelivery, envelope: Envelope) -> None:
        lp = room.local_participant
        provenance = {"bus-source": envelope.source, "bus-topic": envelope.topic}
        if d.content_type:
            provenance[H_CONTENT_TYPE] = d.content_type
        if d.kind == "packet":
            try:
                await lp.publish_data(
                    d.payload,
                    reliable=d.reliable,
                    destination_identities=d.destinations,
                    topic=d.topic,
                )
            except DataPacketTooLargeError:
                if not d.oversize_as_stream:
                    raise RejectedMessage(
                        "too_large", f"{len(d.payload)} bytes exceed the data packet limit"
                    ) from None
                await lp.send_bytes(
                    d.payload,
                    name=d.topic or "message",
                    topic=d.topic or "",
                    destination_identities=d.destinations,
                    attributes=provenance,
                )
        elif d.kind == "text_stream":
            try:
                text = d.payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RejectedMessage("invalid_utf8", str(exc)) from exc
            await lp.send_text(
                text,
                topic=d.topic or "",
                destination_identities=d.destinations,
                attributes={**provenance, **d.attributes},
            )
        elif d.kind == "byte_stream":
            await lp.send_bytes(
                d.payload,
                name=d.name or "message",
                mime_type=d.content_type or d.mime_type,
                topic=d.topic or "",
                destination_identities=d.destinations,
                attributes={**provenance, **d.attributes},
            )
        elif d.kind == "attribute":
            assert d.key is not None
            await lp.set_attributes({d.key: self._text(d)})
        elif d.kind == "room_metadata":
            await self._api().update_room_metadata(d.room, self._text(d))
        elif d.kind == "participant_attribute":
            assert d.identity is not None and d.key is not None
            await self._api().update_participant(
                d.room, d.identity, attributes={d.key: self._text(d)}
            )

    @staticmethod
    def _text(d: RoomDelivery) -> str:
        try:
            return d.payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RejectedMessage("invalid_utf8", str(exc)) from exc

    def _api(self) -> ServerApi:
        if self._server_api is None:
            raise RejectedMessage(
                "no_server_api", "this delivery needs livekit.api_key and api_secret"
            )
        return self._server_api
