"""The bare relay of `bench.fleet_bench`: the bridge's libraries with no routing, the baseline.

Mode ``fleet``: one paho-mqtt (MQTT 5) client on the asyncio loop, as the bridge's connector
runs it (no paho thread; `add_reader` / `add_writer`, manual acknowledgements, the connector's
PUBLISH decoder `connectors.mqtt_publish` instead of paho's), subscribed to
``fleet/+/+/telemetry`` at QoS 1. Each message goes, in arrival order, to our participant's
``publish_data_tracked`` in the room named by the topic (one `bridge.room.Room` per room), and
is acknowledged (PUBACK, in arrival order) once livekit-server has it, as the bridge does: the
baseline gives the same guarantee, so the comparison is of the layer, not of the promise.
Command packets ``command/<device>`` received in a room are published with QoS 1 to
``fleet/<room>/<device>/commands`` (paho keeps up to 100 in flight).

Mode ``kafka``: packets on topic ``bench`` received by our participant go to an aiokafka
producer (acks=all, idempotent, keyed by room), pipelined: up to 1,000 sends in flight.

Mode ``text``: the same producer for text streams on topic ``bench-text``: our participant's
text stream handler reads each stream whole (``read_all``) and queues its UTF-8 bytes.

Identity ``--identity`` (``relay``). Control: ``ready`` once every room is joined and the bus is
connected; on ``quit`` it writes its counters to ``--out``, reports ``done`` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import socket
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from bench.fleet_bench import (
    KAFKA_PACKET_TOPIC,
    KAFKA_TEXT_TOPIC,
    control_lines,
    emit,
    write_result,
)
from bridge.room.delivery import Delivery
from bridge.room.events import DataReceived
from bridge.room.room import Room
from bridge.room.server_api import mint_token
from bridge.room.streams import TextStreamReader
from connectors.mqtt_publish import ReceivedPublish, dispatch_publish


class AsyncPaho:
    """paho-mqtt driven by the asyncio loop (paho's documented external-loop integration)."""

    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.misc: asyncio.Task[None] | None = None
        client.on_socket_open = self._open
        client.on_socket_close = self._close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write

    def _open(self, _c: paho.Client, _u: object, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop.add_reader(sock, self.client.loop_read)
        self.misc = self.loop.create_task(self._loop_misc())

    def _close(self, _c: paho.Client, _u: object, sock: Any) -> None:
        self.loop.remove_reader(sock)
        if self.misc is not None:
            self.misc.cancel()

    def _register_write(self, _c: paho.Client, _u: object, sock: Any) -> None:
        self.loop.add_writer(sock, self.client.loop_write)

    def _unregister_write(self, _c: paho.Client, _u: object, sock: Any) -> None:
        self.loop.remove_writer(sock)

    async def _loop_misc(self) -> None:
        # paho's keepalive bookkeeping wants a call about once a second.
        while True:
            if self.client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                return
            await asyncio.sleep(1)


class _Client(paho.Client):
    """paho with the bridge's PUBLISH decoder (`connectors.mqtt_publish`), as the bridge has it.

    The baseline runs on the same building blocks as the bridge: paho's protocol with the
    decoder that replaces its per-message objects, and our participant.
    """

    fast_receiver: Any = None

    def _handle_publish(self) -> MQTTErrorCode:
        if self.fast_receiver is not None and dispatch_publish(self, self.fast_receiver):
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_publish()


class Relay:
    """The relay's rooms, bus client and counters."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names = args.rooms.split(",")
        self.rooms: dict[str, Room] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.inbox: collections.deque[tuple[str, str, bytes, int]] = collections.deque()
        # Received, sent into the room, not acknowledged yet: (mid, delivery), arrival order.
        self.unacked: collections.deque[tuple[int, Delivery | None]] = collections.deque()
        self.wake = asyncio.Event()
        self.client: paho.Client | None = None
        self.producer: Any = None
        self.kafka_inbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self.in_flight: set[asyncio.Future[Any]] = set()
        self.workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.args.mode == "fleet":
            await self._start_mqtt()
        else:
            from aiokafka import AIOKafkaProducer

            self.producer = AIOKafkaProducer(
                bootstrap_servers=self.args.kafka, acks="all", enable_idempotence=True
            )
            await self.producer.start()
        await asyncio.gather(*(self._join(name) for name in self.names))
        worker = self._mqtt_worker() if self.args.mode == "fleet" else self._kafka_worker()
        self.workers.append(asyncio.create_task(worker))

    async def _join(self, name: str) -> None:
        room = Room()
        room.on(DataReceived, lambda event: self._on_packet(name, event))
        if self.args.mode == "text":

            async def on_text(reader: TextStreamReader, _identity: str) -> None:
                await self._on_text(name, reader)

            room.register_text_stream_handler(KAFKA_TEXT_TOPIC, on_text)
        token = mint_token(
            self.args.api_key, self.args.api_secret, identity=self.args.identity, room=name
        )
        await room.connect(self.args.url, token)
        self.rooms[name] = room

    async def _start_mqtt(self) -> None:
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fleet-relay-{self.args.identity}",
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        client.max_inflight_messages_set(100)
        AsyncPaho(client)
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[None] = loop.create_future()
        subscribed: asyncio.Future[None] = loop.create_future()

        def on_connect(*_a: object) -> None:
            if not connected.done():
                connected.set_result(None)

        def on_subscribe(*_a: object) -> None:
            if not subscribed.done():
                subscribed.set_result(None)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = self._on_mqtt
        client.fast_receiver = self._on_mqtt
        client.connect("127.0.0.1", self.args.mqtt_port, clean_start=True)
        await asyncio.wait_for(connected, 15)
        client.subscribe("fleet/+/+/telemetry", qos=1)
        await asyncio.wait_for(subscribed, 15)
        self.client = client

    # --- MQTT -> room

    def _on_mqtt(
        self, _c: paho.Client, _u: object, message: paho.MQTTMessage | ReceivedPublish
    ) -> None:
        _, room, device, _ = message.topic.split("/", 3)
        self.inbox.append((room, device, bytes(message.payload), message.mid))
        self.wake.set()

    async def _mqtt_worker(self) -> None:
        assert self.client is not None
        while True:
            while not self.inbox:
                self.wake.clear()
                await self.wake.wait()
            room_name, device, payload, mid = self.inbox.popleft()
            room = self.rooms.get(room_name)
            delivery: Delivery | None = None
            try:
                if room is None:
                    raise LookupError(f"no room {room_name}")
                delivery = await room.local_participant.publish_data_tracked(
                    payload, topic=f"telemetry.{device}"
                )
            except Exception as exc:  # noqa: BLE001 - counted; a baseline does not retry
                self.errors[type(exc).__name__] += 1
            # PUBACK once the server has it (as the bridge does), in arrival order (MQTT 4.6).
            self.unacked.append((mid, delivery))
            if delivery is None or delivery.done():
                self._release_acks()
            else:
                delivery.add_done_callback(self._release_acks)

    def _release_acks(self, _done: object = None) -> None:
        assert self.client is not None
        unacked = self.unacked
        while unacked and (unacked[0][1] is None or unacked[0][1].done()):
            mid, delivery = unacked.popleft()
            if delivery is not None:
                if delivery.failed() is None:
                    self.counts["mqtt_to_room"] += 1
                else:
                    self.errors["not delivered"] += 1
            self.client.ack(mid, 1)

    # --- room -> bus

    def _on_packet(self, room: str, event: DataReceived) -> None:
        topic = event.packet.topic or ""
        if self.args.mode == "fleet" and topic.startswith("command/"):
            assert self.client is not None
            device = topic.removeprefix("command/")
            info = self.client.publish(f"fleet/{room}/{device}/commands", event.packet.data, qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self.errors[f"mqtt publish rc {info.rc}"] += 1
            else:
                self.counts["room_to_mqtt"] += 1
        elif self.args.mode == "kafka" and topic == KAFKA_PACKET_TOPIC:
            self.kafka_inbox.append((room, event.packet.data))
            self.wake.set()

    async def _on_text(self, room: str, reader: TextStreamReader) -> None:
        try:
            text = await reader.read_all()
        except Exception as exc:  # noqa: BLE001 - counted; a baseline does not retry
            self.errors[f"text stream {type(exc).__name__}"] += 1
            return
        self.kafka_inbox.append((room, text.encode()))
        self.wake.set()

    async def _kafka_worker(self) -> None:
        while True:
            while not self.kafka_inbox:
                self.wake.clear()
                await self.wake.wait()
            room, data = self.kafka_inbox.popleft()
            while len(self.in_flight) >= 1000:
                await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
            # send() returns once the record is in the batch; delivery is the future.
            future = await self.producer.send(self.args.kafka_topic, data, key=room.encode())
            self.in_flight.add(future)
            future.add_done_callback(self._produced)

    def _produced(self, future: asyncio.Future[Any]) -> None:
        self.in_flight.discard(future)
        if future.cancelled() or future.exception() is not None:
            self.errors["kafka produce"] += 1
        else:
            self.counts["room_to_kafka"] += 1

    async def close(self) -> None:
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=10)
        if self.producer is not None:
            await self.producer.stop()
        if self.client is not None:
            self.client.disconnect()
        for room in self.rooms.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(room.disconnect(), 10)


async def main_async(args: argparse.Namespace) -> None:
    relay = Relay(args)
    try:
        await relay.start()
        emit("ready")
        async for line in control_lines():
            if line == "quit":
                break
    finally:
        write_result(args.out, {"counts": dict(relay.counts), "errors": dict(relay.errors)})
        emit("done")
        await relay.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=["fleet", "kafka", "text"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--api-secret", required=True)
    parser.add_argument("--identity", default="relay")
    parser.add_argument("--rooms", required=True)
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--kafka", default="")
    parser.add_argument("--kafka-topic", default="")
    parser.add_argument("--out", required=True)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
