"""Load generator of `bench.fleet_bench`: many MQTT devices on one event loop in one process.

Each device is its own MQTT 3.1.1 connection (clean session, no keepalive) to Mosquitto, made by
the minimal client below: the load generators share the machine's cores with the bridge, and a
full client library costs several times more CPU per message than these few lines of packet
encoding. Each device publishes QoS 1 telemetry to ``fleet/{room}/{device}/telemetry`` at
``--rate`` (phases spread evenly over all devices of the fleet), counts PUBACKs, and subscribes
at QoS 1 to ``fleet/{room}/{device}/commands``, recording every command it receives.

Controlled by the orchestrator over stdin/stdout (`bench.fleet_bench.control_lines`):
``ready`` once every device is connected and subscribed; on ``probe`` each room's first device
publishes a probe every 0.5 s, and a probe command received is reported as ``seen``; on
``start <t0 ns>`` the load runs from t0 for ``--duration`` s, then the process waits until no
command arrived for ``--drain-quiet`` s, writes its result file and reports ``done``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import time

from bench.fleet_bench import (
    KIND_DATA,
    KIND_PROBE,
    Deliveries,
    common_args,
    control_lines,
    device_name,
    emit,
    pack,
    room_of,
    unpack,
    wait_drained,
    write_result,
)

_U16 = struct.Struct("!H")


def _length(n: int) -> bytes:
    """MQTT's variable-length Remaining Length."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return _U16.pack(len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _length(len(body)) + body


class Device(asyncio.Protocol):
    """One device: an MQTT 3.1.1 connection that publishes QoS 1 and takes QoS 1 commands."""

    def __init__(self, name: str, room: str, fleet: Fleet) -> None:
        self.name = name
        self.topic = f"fleet/{room}/{name}/telemetry".encode()
        self.command_topic = f"fleet/{room}/{name}/commands"
        self.fleet = fleet
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.next_id = 0
        self.in_flight: set[int] = set()
        self.sent = 0
        self.acked = 0
        self.connack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.commands = Deliveries()

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a PUBACK must not wait for a delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.fleet.stopping:
            self.fleet.notes.append(f"{self.name}: connection lost ({exc})")
        for future in (self.connack, self.suback):
            if not future.done():
                future.set_exception(ConnectionError(f"{self.name}: connection lost"))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= 2:
            length, multiplier, i = 0, 1, 1
            while True:
                if i >= len(buf):
                    return
                byte = buf[i]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                i += 1
                if not byte & 0x80:
                    break
            if len(buf) < i + length:
                return
            first = buf[0]
            body = bytes(buf[i : i + length])
            del buf[: i + length]
            self._handle(first >> 4, first & 0x0F, body)

    def _handle(self, kind: int, flags: int, body: bytes) -> None:
        if kind == 4:  # PUBACK
            packet_id = _U16.unpack_from(body)[0]
            if packet_id in self.in_flight:
                self.in_flight.discard(packet_id)
                self.acked += 1
        elif kind == 3:  # PUBLISH: a command
            qos = (flags >> 1) & 3
            topic_len = _U16.unpack_from(body)[0]
            pos = 2 + topic_len
            if qos:
                assert self.transport is not None
                self.transport.write(b"\x40\x02" + body[pos : pos + 2])
                pos += 2
            self.fleet.on_command(self, body[pos:])
        elif kind == 2 and not self.connack.done():  # CONNACK
            if body[1] == 0:
                self.connack.set_result(None)
            else:
                self.connack.set_exception(ConnectionError(f"CONNACK refused: {body[1]}"))
        elif kind == 9 and not self.suback.done():  # SUBACK
            if body[-1] == 0x80:
                self.suback.set_exception(ConnectionError("SUBACK refused"))
            else:
                self.suback.set_result(None)

    # --- actions

    async def connect(self, port: int, client_id: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, "127.0.0.1", port)
        assert self.transport is not None
        # Protocol "MQTT" level 4, clean session, keepalive 0 (off: the run is bounded).
        body = _string("MQTT") + b"\x04\x02\x00\x00" + _string(client_id)
        self.transport.write(_packet(0x10, body))
        await asyncio.wait_for(self.connack, 15)
        self.transport.write(
            _packet(0x82, _U16.pack(self._packet_id()) + _string(self.command_topic) + b"\x01")
        )
        await asyncio.wait_for(self.suback, 15)

    def _packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    def publish(self, payload: bytes, counted: bool) -> None:
        if self.transport is None:
            return
        packet_id = self._packet_id()
        body = _U16.pack(len(self.topic)) + self.topic + _U16.pack(packet_id) + payload
        self.transport.write(_packet(0x32, body))
        if counted:
            self.in_flight.add(packet_id)
            self.sent += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(b"\xe0\x00")  # DISCONNECT
            self.transport.close()


class Fleet:
    """The devices of this process and what they saw."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rooms = args.rooms.split(",")
        self.devices = [
            Device(device_name(i), self.rooms[room_of(i, len(self.rooms))], self)
            for i in range(args.first, args.first + args.count)
        ]
        self.t0_ns = 0
        self.last_command = 0.0
        self.reported: set[str] = set()
        self.stopping = False
        self.notes: list[str] = []

    def on_command(self, device: Device, payload: bytes) -> None:
        parsed = unpack(payload)
        now = time.monotonic_ns()
        if parsed is None or parsed[1] != self.args.run.encode():
            return
        kind, _run, _sender, seq, sent_ns = parsed
        if kind == KIND_PROBE:
            if device.name not in self.reported:
                self.reported.add(device.name)
                emit("seen", what=f"device:{device.name}")
            return
        if kind == KIND_DATA and self.t0_ns:
            device.commands.add(seq, sent_ns, now, self.t0_ns)
            self.last_command = now / 1e9

    async def probe(self, stop: asyncio.Event) -> None:
        """Each room's first device (index < rooms) publishes probes until the load starts."""
        firsts = [d for i, d in enumerate(self.devices, self.args.first) if i < len(self.rooms)]
        while firsts and not stop.is_set():
            for device in firsts:
                device.publish(pack(self.args.run, KIND_PROBE, device.name, 0, 64), counted=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def load(self, t0: float) -> None:
        """Every device sends `rate * duration` messages; phases spread over the whole fleet."""
        args = self.args
        interval = 1.0 / args.rate
        per_device = int(args.rate * args.duration)
        slot = interval / args.total  # the gap between two devices' sends, fleet-wide
        for k in range(per_device):
            for j, device in enumerate(self.devices):
                await _sleep_until(t0 + k * interval + (args.first + j) * slot)
                device.publish(pack(args.run, KIND_DATA, device.name, k, args.size), counted=True)

    def result(self) -> dict[str, object]:
        return {
            "telemetry_sent": {d.name: d.sent for d in self.devices},
            "telemetry_acked": sum(d.acked for d in self.devices),
            "commands_seen": {d.name: d.commands.seen for d in self.devices},
            "notes": self.notes[:5],
        }


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def main_async(args: argparse.Namespace) -> None:
    fleet = Fleet(args)
    for device in fleet.devices:  # one at a time: Mosquitto accepts a burst, but keep it gentle
        await device.connect(args.mqtt_port, f"{args.run}-{device.name}")
    emit("ready")
    started = asyncio.Event()
    probing: asyncio.Task[None] | None = None
    try:
        async for line in control_lines():
            if line == "probe" and probing is None:
                probing = asyncio.create_task(fleet.probe(started))
            elif line.startswith("start "):
                started.set()
                t0 = int(line.split()[1]) / 1e9
                fleet.t0_ns = int(t0 * 1e9)
                await _sleep_until(t0)
                await fleet.load(t0)
                end = t0 + args.duration
                await wait_drained(
                    lambda: fleet.last_command, end, args.drain_quiet, args.drain_max
                )
                # Telemetry PUBACKs still missing get a last chance before counting.
                for _ in range(int(args.drain_quiet / 0.05)):
                    if not any(d.in_flight for d in fleet.devices):
                        break
                    await asyncio.sleep(0.05)
                write_result(args.out, fleet.result())
                emit("done")
            elif line == "quit":
                break
    finally:
        started.set()
        if probing is not None:
            await probing
        fleet.stopping = True
        for device in fleet.devices:
            device.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    common_args(parser)
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--first", type=int, required=True, help="index of the first device")
    parser.add_argument("--count", type=int, required=True, help="devices in this process")
    parser.add_argument("--total", type=int, required=True, help="devices in the fleet")
    parser.add_argument("--rate", type=float, required=True, help="msg/s per device")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
