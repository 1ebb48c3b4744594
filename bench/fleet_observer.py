"""Load generators of `bench.fleet_bench` on the room and Kafka side.

Modes:

* ``fleet``: one official-SDK participant (``observer-<room>``) per room of ``--rooms`` (a few
  rooms per process), receiving the devices' ``telemetry.<device>`` packets and sending commands
  on ``command/<device>`` at ``--cmd-rate`` per room, round robin over the room's devices.
* ``send``: one SDK participant per room publishing packets on topic ``bench`` at
  ``--send-rate`` per room (room→Kafka load); with ``--send-kind text``, text streams
  (``send_text``, `pack_text`, ``--size`` characters) on topic ``bench-text`` instead.
* ``kafka``: an aiokafka consumer of ``--kafka-topic`` (every partition, from the beginning),
  checking what the target produced.

The SDK's ``publish_data`` resolves only after a round trip through its FFI, so a few calls per
room stay in flight (`Window`); they reach the FFI in call order. Control over stdin/stdout
as in `bench.fleet_devices`: ``ready``, ``probe`` (probes until ``start``; the receiving side
reports ``seen``), ``start <t0 ns>``, then ``done`` after the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

from bench.fleet_bench import (
    KAFKA_PACKET_TOPIC,
    KAFKA_TEXT_TOPIC,
    KIND_DATA,
    KIND_PROBE,
    Deliveries,
    common_args,
    control_lines,
    device_name,
    emit,
    pace,
    pack,
    pack_text,
    room_names,
    room_of,
    unpack,
    wait_drained,
    write_result,
)


class Window:
    """At most `size` publishes in flight; counts how they end."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: set[asyncio.Task[None]] = set()
        self.ok = 0
        self.failed = 0
        self.first_error = ""

    async def submit(self, publish: Coroutine[Any, Any, None]) -> None:
        while len(self.pending) >= self.size:
            await asyncio.wait(self.pending, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(publish)
        self.pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.pending.discard(task)
        if task.cancelled():
            self.failed += 1
        elif (exc := task.exception()) is not None:
            self.failed += 1
            self.first_error = self.first_error or repr(exc)
        else:
            self.ok += 1

    async def flush(self, within: float) -> None:
        if self.pending:
            await asyncio.wait(self.pending, timeout=within)


class SdkRooms:
    """The SDK participants of this process (modes ``fleet`` and ``send``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names = args.rooms.split(",")
        everyone = room_names(args.all_rooms)
        self.index = {name: everyone.index(name) for name in self.names}
        self.devices = {
            name: [
                device_name(i)
                for i in range(args.devices)
                if room_of(i, args.all_rooms) == self.index[name]
            ]
            for name in self.names
        }
        self.rooms: dict[str, Any] = {}
        self.window = {name: Window(args.window) for name in self.names}
        self.t0_ns = 0
        self.last_arrival = 0.0
        self.reported: set[str] = set()
        self.telemetry: dict[str, Deliveries] = {}
        self.sent: dict[str, int] = {}
        self.run = args.run.encode()

    async def join(self) -> None:
        from livekit import rtc

        from bridge.room.server_api import mint_token

        async def one(name: str) -> None:
            room = rtc.Room()
            if self.args.mode == "fleet":
                room.on("data_received", lambda packet: self._on_packet(name, packet))
            token = mint_token(
                self.args.api_key, self.args.api_secret, identity=f"observer-{name}", room=name
            )
            await room.connect(self.args.url, token)
            self.rooms[name] = room
            # The SDK drops packets from participants it does not know yet.
            deadline = time.monotonic() + 30
            peer = self.args.peer.replace("{room}", name)  # one identity per room (replicas)
            while peer not in room.remote_participants:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: {peer} not seen within 30 s")
                await asyncio.sleep(0.1)

        await asyncio.gather(*(one(name) for name in self.names))

    def _on_packet(self, room: str, packet: Any) -> None:
        topic = packet.topic or ""
        if not topic.startswith("telemetry."):
            return
        parsed = unpack(packet.data)
        now = time.monotonic_ns()
        if parsed is None or parsed[1] != self.run:
            return
        kind, _run, sender, seq, sent_ns = parsed
        if kind == KIND_PROBE:
            if room not in self.reported:
                self.reported.add(room)
                emit("seen", what=f"room:{room}")
        elif self.t0_ns:
            self.telemetry.setdefault(sender, Deliveries()).add(seq, sent_ns, now, self.t0_ns)
            self.last_arrival = now / 1e9

    def _publish(self, name: str, payload: bytes, topic: str) -> Coroutine[Any, Any, None]:
        publish: Coroutine[Any, Any, None] = self.rooms[name].local_participant.publish_data(
            payload, reliable=True, topic=topic
        )
        return publish

    async def _send_text(self, name: str, text: str) -> None:
        await self.rooms[name].local_participant.send_text(text, topic=KAFKA_TEXT_TOPIC)

    def _send(
        self, name: str, kind: int, sender: str, seq: int, size: int
    ) -> Coroutine[Any, Any, None]:
        """Mode ``send``: a packet on ``bench`` or a text stream on ``bench-text``."""
        if self.args.send_kind == "text":
            return self._send_text(name, pack_text(self.args.run, kind, sender, seq, size))
        payload = pack(self.args.run, kind, sender, seq, size)
        return self._publish(name, payload, KAFKA_PACKET_TOPIC)

    async def probe(self, stop: asyncio.Event) -> None:
        """Fleet: a probe command to each room's first device; send: a probe packet per room."""
        while not stop.is_set():
            for name in self.names:
                if self.args.mode == "fleet":
                    if self.devices[name]:
                        first = self.devices[name][0]
                        probe = pack(self.args.run, KIND_PROBE, first, 0, 64)
                        await self.window[name].submit(
                            self._publish(name, probe, f"command/{first}")
                        )
                else:
                    await self.window[name].submit(self._send(name, KIND_PROBE, name, 0, 64))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        for window in self.window.values():  # probes do not count as sent
            await window.flush(10)
            window.ok = window.failed = 0

    async def load_room(self, name: str, t0: float) -> None:
        args = self.args
        window = self.window[name]
        if args.mode == "fleet":
            rate, devices = args.cmd_rate, self.devices[name]
            if not devices or rate <= 0:
                return
        else:
            rate, devices = args.send_rate, [name]
        interval = 1.0 / rate
        phase = interval * self.index[name] / args.all_rooms
        async for k in pace(t0, int(rate * args.duration), interval, phase):
            target = devices[k % len(devices)]
            seq = k // len(devices)
            self.sent[target] = self.sent.get(target, 0) + 1
            if args.mode == "fleet":
                payload = pack(args.run, KIND_DATA, target, seq, args.size)
                await window.submit(self._publish(name, payload, f"command/{target}"))
            else:
                await window.submit(self._send(name, KIND_DATA, target, seq, args.size))

    async def load(self, t0: float) -> None:
        await asyncio.gather(*(self.load_room(name, t0) for name in self.names))
        for window in self.window.values():
            await window.flush(30)
        if self.args.mode == "fleet":
            await wait_drained(
                lambda: self.last_arrival,
                t0 + self.args.duration,
                self.args.drain_quiet,
                self.args.drain_max,
            )

    def result(self) -> dict[str, object]:
        acked = sum(w.ok for w in self.window.values())
        errors = [w.first_error for w in self.window.values() if w.first_error]
        notes = (
            [f"SDK publish_data failed {sum(w.failed for w in self.window.values())}: {errors[0]}"]
            if errors
            else []
        )
        if self.args.mode == "fleet":
            return {
                "telemetry_seen": {k: v.seen for k, v in self.telemetry.items()},
                "commands_sent": self.sent,
                "commands_acked": acked,
                "notes": notes,
            }
        return {"kafka_sent": self.sent, "kafka_acked": acked, "notes": notes}

    async def close(self) -> None:
        for room in self.rooms.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(room.disconnect(), 10)


class KafkaCheck:
    """The consumer of mode ``kafka``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0_ns = 0
        self.last_arrival = 0.0
        self.reported: set[str] = set()
        self.seen: dict[str, Deliveries] = {}
        self.run = args.run.encode()
        self.consumer: Any = None
        self.reader: asyncio.Task[None] | None = None

    async def join(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.args.kafka,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await self.consumer.start()
        topic = self.args.kafka_topic
        partitions = range(self.args.partitions)  # the orchestrator created the topic
        assigned = [TopicPartition(topic, p) for p in partitions]
        self.consumer.assign(assigned)
        await self.consumer.seek_to_beginning(*assigned)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=200, max_records=2000)
            now = time.monotonic_ns()
            for records in batches.values():
                for record in records:
                    parsed = unpack(record.value or b"")
                    if parsed is None or parsed[1] != self.run:
                        continue
                    kind, _run, sender, seq, sent_ns = parsed
                    if kind == KIND_PROBE:
                        if sender not in self.reported:
                            self.reported.add(sender)
                            emit("seen", what=f"room:{sender}")
                    elif self.t0_ns:
                        self.seen.setdefault(sender, Deliveries()).add(
                            seq, sent_ns, now, self.t0_ns
                        )
                        self.last_arrival = now / 1e9

    async def probe(self, stop: asyncio.Event) -> None:
        """Nothing to send: the senders probe, this side reports."""

    async def load(self, t0: float) -> None:
        await wait_drained(
            lambda: self.last_arrival,
            t0 + self.args.duration,
            self.args.drain_quiet,
            self.args.drain_max,
        )

    def result(self) -> dict[str, object]:
        return {"kafka_seen": {k: v.seen for k, v in self.seen.items()}}

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        if self.consumer is not None:
            await self.consumer.stop()


async def main_async(args: argparse.Namespace) -> None:
    side: SdkRooms | KafkaCheck = KafkaCheck(args) if args.mode == "kafka" else SdkRooms(args)
    started = asyncio.Event()
    probing: asyncio.Task[None] | None = None
    try:
        await side.join()
        emit("ready")
        async for line in control_lines():
            if line == "probe" and probing is None:
                probing = asyncio.create_task(side.probe(started))
            elif line.startswith("start "):
                started.set()
                if probing is not None:
                    await probing
                t0 = int(line.split()[1]) / 1e9
                side.t0_ns = int(line.split()[1])
                await side.load(t0)
                write_result(args.out, side.result())
                emit("done")
            elif line == "quit":
                break
    finally:
        started.set()
        if probing is not None and not probing.done():
            probing.cancel()
        await side.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    common_args(parser)
    parser.add_argument("--mode", choices=["fleet", "send", "kafka"], required=True)
    parser.add_argument("--url", default="")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--api-secret", default="")
    parser.add_argument("--all-rooms", type=int, default=0, help="rooms in the whole run")
    parser.add_argument("--devices", type=int, default=0, help="devices in the whole fleet")
    parser.add_argument(
        "--peer",
        default="bridge",
        help="identity of the target participant ({room}: the room's name)",
    )
    parser.add_argument("--cmd-rate", type=float, default=1.0, help="commands/s per room")
    parser.add_argument("--send-rate", type=float, default=25.0, help="packets/s per room (send)")
    parser.add_argument("--send-kind", choices=["packet", "text"], default="packet")
    parser.add_argument("--window", type=int, default=8, help="SDK publishes in flight per room")
    parser.add_argument("--kafka", default="", help="bootstrap server (mode kafka)")
    parser.add_argument("--kafka-topic", default="")
    parser.add_argument("--partitions", type=int, default=1, help="partitions of --kafka-topic")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
