"""The reusable pieces of the fault scenarios: the bridge as a process, its /metrics, the loads
and collectors on each side, and the faults themselves.

* `BridgeProc`: `python -m bridge run CONFIG` (same config and state dir across restarts) with
  its HTTP port: `kill()` (SIGKILL), `stop()` (SIGTERM, drains), `start()`, `wait_ready()`,
  `metrics()` (the Prometheus text parsed).
* Loads and collectors, each recording into a `checker.Leg`: `MqttPublisher` (QoS 1, a message
  is acknowledged by the broker's PUBACK), `MqttCollector` (QoS 1 subscriber with a persistent
  session), `RoomPublisher` (an official-SDK participant sending reliable or lossy packets),
  `RoomObserver` (an official-SDK participant receiving packets; optionally slow),
  `read_kafka` (reads a topic from the start; a topic made with `LogAppendTime` gives the
  broker's append time as the time of delivery). `pace()` runs a bounded, paced load.
* Faults: services restart/kill (`tests.services`), `FaultProxy` (`tests/faults/proxy.py`),
  `PacketFilter` (iptables inside the test namespace: random loss or a full drop of one
  process's UDP/TCP flows) and `netem_available()`.

The time budget is bounded everywhere: loads by count and time, waits by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from livekit import rtc
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_token
from tests.faults.checker import Leg, parse
from tests.services import LIVEKIT_API_KEY, LIVEKIT_API_SECRET, Kafka, LiveKitServer

ROOT = Path(__file__).resolve().parents[2]

FULL = os.environ.get("ROOMBUS_FAULTS_FULL", "") not in ("", "0")


def pick(short: float, full: float) -> float:
    """A figure of the short (CI) or the long (`scripts/faults --full`) version of a scenario."""
    return full if FULL else short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Wait until `predicate()`; the seconds it took. AssertionError naming `what` on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - start


async def settle(legs: list[Leg], timeout: float = 90, quiet: float = 10) -> None:
    """Wait until every acknowledged message of `legs` arrived, or nothing arrived for `quiet`
    seconds (the rest is lost), or `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(leg.seen_all_acked() for leg in legs):
            break
        last = max([start] + [leg.last_delivery for leg in legs])
        if time.monotonic() - last > quiet:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)  # late duplicates


class Sink(Protocol):
    def deliver(self, data: bytes | str, t_recv: float | None = None) -> None: ...


class Dispatch:
    """Deliveries to several legs by the header's source (one receiver, many legs)."""

    def __init__(self, *legs: Leg) -> None:
        self.legs = {leg.source: leg for leg in legs}
        self.first = legs[0]

    def deliver(self, data: bytes | str, t_recv: float | None = None) -> None:
        head = parse(data)
        leg = self.legs.get(head.source, self.first) if head is not None else self.first
        leg.deliver(data, t_recv)


# --- the bridge -------------------------------------------------------------------------------


def bridge_head(livekit: LiveKitServer, room: str) -> str:
    return f"""\
livekit:
  url: {livekit.url}
  api_key: {LIVEKIT_API_KEY}
  api_secret: {LIVEKIT_API_SECRET}
  identity: bridge
  rooms: [{room}]
"""


def bridge_section(state_dir: Path, http_port: int, extra: str = "") -> str:
    return (
        f"bridge:\n  state_dir: {state_dir}\n  shutdown_timeout: 10\n  http_port: {http_port}\n"
        + extra
    )


def mqtt_section(port: int, client_id: str, keepalive: int = 5) -> str:
    return (
        f"mqtt:\n  bus:\n    host: 127.0.0.1\n    port: {port}\n"
        f"    client_id: {client_id}\n    keepalive: {keepalive}\n"
    )


def kafka_section(bootstrap: str) -> str:
    return f"kafka:\n  main:\n    bootstrap_servers: [{bootstrap}]\n"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Metrics:
    """One scrape of /metrics."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def get(self, name: str, **labels: str) -> float:
        """The sum of the samples `name` whose labels include `labels` (0 if none)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


class BridgeProc:
    """The bridge as its own process, its log in a file; restartable with the same config."""

    def __init__(self, tmp: Path, yaml_text: str, http_port: int) -> None:
        self.config = tmp / "roombus.yaml"
        self.config.write_text(yaml_text)
        self.log = tmp / "roombus.log"
        self.http_port = http_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts} =====\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", str(self.config)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM: drain and exit; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"the bridge did not stop within {timeout} s\n{self.tail()}"
            ) from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def left_room_at(self) -> float | None:
        """When the bridge last left its room on a stop (its own log line), time.time()."""
        found = None
        for line in self.log.read_text(errors="replace").splitlines():
            if "closed: bridge stopping" in line:
                found = datetime.fromisoformat(line.split()[0]).timestamp()
        return found

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def _get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def ready_now(self) -> bool:
        try:
            return self._get("/ready")[0] == 200
        except OSError:
            return False

    async def wait_ready(self, timeout: float = 60) -> float:
        """Wait for /ready (rooms joined, buses up); the seconds it took."""
        start = time.monotonic()
        while not await asyncio.to_thread(self.ready_now):
            if not self.alive():
                raise AssertionError(f"the bridge exited\n{self.tail()}")
            if time.monotonic() - start > timeout:
                raise AssertionError(f"the bridge was not ready in {timeout} s\n{self.tail()}")
            await asyncio.sleep(0.1)
        return time.monotonic() - start

    async def metrics(self) -> Metrics:
        status, text = await asyncio.to_thread(self._get, "/metrics")
        assert status == 200, f"/metrics answered {status}"
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return Metrics(samples)

    async def drained(self, timeout: float) -> None:
        """Wait until no room-to-bus route holds a message (buffer and in-flight at 0)."""
        deadline = time.monotonic() + timeout
        while True:
            m = await self.metrics()
            if m.get("roombus_route_queue_depth") == 0 and m.get("roombus_route_in_flight") == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the bridge's buffers did not drain in {timeout} s")
            await asyncio.sleep(0.2)


# --- loads ------------------------------------------------------------------------------------


async def pace(
    rate: float,
    seconds: float,
    send: Callable[[int], Awaitable[None] | None],
    stop: asyncio.Event | None = None,
) -> int:
    """Call `send(i)` `rate` times a second for `seconds` (at most rate x seconds calls)."""
    start = time.monotonic()
    limit = int(rate * seconds)
    n = 0
    while n < limit and not (stop is not None and stop.is_set()):
        due = min(limit, int((time.monotonic() - start) * rate) + 1)
        while n < due:
            out = send(n)
            if out is not None:
                await out
            n += 1
        await asyncio.sleep(0.005)
    return n


class MqttPublisher:
    """Devices on MQTT (paho, its own thread): QoS 1 publishes; acknowledged on PUBACK.

    Reconnects by itself within two seconds of the broker's return; what it could not send while
    the broker was away it sends then (not acknowledged until PUBACKed).
    """

    def __init__(self, port: int, leg: Leg, host: str = "127.0.0.1") -> None:
        self.leg = leg
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"devices-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self._infos: list[tuple[Leg, tuple[str, int], mqtt.MQTTMessageInfo]] = []
        self._acked_upto = 0
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, topic: str, key: str, size: int = 0) -> None:
        leg = self.leg
        mid, payload = leg.next(key, size)
        self._infos.append((leg, mid, self.client.publish(topic, payload, qos=1)))

    def settle(self) -> int:
        """Record the PUBACKed ones as acknowledged; how many are still waiting."""
        waiting = 0
        for leg, mid, info in self._infos:
            # Not `is_published()`: it raises for a message published while disconnected
            # (rc NO_CONN), although paho queued it and sends it after reconnecting.
            if info._published:
                leg.ack(mid)
            else:
                waiting += 1
        return waiting

    async def all_acked(self, timeout: float = 60) -> None:
        await wait_for(lambda: self.settle() == 0, timeout, "every PUBACK to the publisher")

    def close(self) -> None:
        self.settle()
        self.client.loop_stop()
        self.client.disconnect()


class MqttCollector:
    """A QoS 1 subscriber with a persistent session (what the broker queues while it is away
    or restarting is kept), resubscribing on every connect."""

    def __init__(self, port: int, topic: str, leg: Sink, slow: float = 0.0) -> None:
        self.leg = leg
        self.topic = topic
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.reconnect_delay_set(1, 2)
        self.subscribed = threading.Event()
        self.connects = 0

        def on_connect(c: mqtt.Client, *_a: object) -> None:
            self.connects += 1
            c.subscribe(topic, 1)

        def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            self.leg.deliver(bytes(message.payload))
            if slow:
                time.sleep(slow)  # a slow subscriber: blocks paho's own thread only

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    async def ready(self) -> None:
        assert await asyncio.to_thread(self.subscribed.wait, 15), "the collector got no SUBACK"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class RoomPublisher:
    """An official-SDK participant sending packets on `topic`; a send that returned is
    acknowledged, unless it falls in one of the leg's unacknowledged windows (the bridge away)."""

    def __init__(
        self,
        room: rtc.Room,
        leg: Leg,
        topic: str,
        reliable: bool = True,
        also: Leg | None = None,
    ) -> None:
        """`also`: a second leg checking the same packets on another route (e.g. room → Kafka
        beside room → MQTT); each packet is recorded as sent, and acknowledged, on both."""
        self.room = room
        self.leg = leg
        self.topic = topic
        self.reliable = reliable
        self.also = also
        self.failures = 0

    async def send(self, key: str, size: int = 0) -> None:
        mid, payload = self.leg.next(key, size)
        if self.also is not None:
            self.also.sent[mid] = self.leg.sent[mid]
        try:
            await self.room.local_participant.publish_data(
                payload, reliable=self.reliable, topic=self.topic
            )
        except Exception:  # noqa: BLE001  # the SDK refused (disconnected): not acknowledged
            self.failures += 1
            return
        self.leg.ack(mid)
        if self.also is not None:
            self.also.ack(mid)


class RoomObserver:
    """Records the packets an official-SDK participant receives (`slow`: seconds of blocking
    work per packet in the SDK's callback: a slow subscriber)."""

    def __init__(self, room: rtc.Room, leg: Sink, slow: float = 0.0) -> None:
        self.leg = leg
        self.slow = slow
        self.packets = 0
        room.on("data_received", self._on_data)

    def _on_data(self, packet: rtc.DataPacket) -> None:
        self.packets += 1
        self.leg.deliver(packet.data)
        if self.slow:
            time.sleep(self.slow)


@asynccontextmanager
async def sdk_room(server: LiveKitServer, room: str, identity: str) -> AsyncIterator[rtc.Room]:
    peer = rtc.Room()
    await peer.connect(server.url, make_token(server, room, identity))
    try:
        yield peer
    finally:
        with contextlib.suppress(Exception):
            await peer.disconnect()


async def connect_sdk_room(
    server: LiveKitServer, room: str, identity: str, timeout: float = 60
) -> rtc.Room:
    """Connect, retrying while the server is away (after a restart); the caller disconnects."""
    deadline = time.monotonic() + timeout
    while True:
        peer = rtc.Room()
        try:
            await asyncio.wait_for(peer.connect(server.url, make_token(server, room, identity)), 15)
            return peer
        except Exception:
            with contextlib.suppress(Exception):
                await peer.disconnect()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def bridge_in_room(peer: rtc.Room, timeout: float = 60, not_sid: str = "") -> str:
    """Wait until the participant `bridge` is in the room (with another sid); its sid."""

    def there() -> bool:
        p = peer.remote_participants.get("bridge")
        return p is not None and p.sid != not_sid

    await wait_for(there, timeout, "the bridge to appear in the room")
    return peer.remote_participants["bridge"].sid


class Closable(Protocol):
    def close(self) -> None: ...


def shut_down(bridge: BridgeProc, *clients: Closable) -> None:
    """A scenario's `finally`: close its bus clients (in the order given), then SIGKILL the
    bridge if it still runs (the scenario failed before stopping it)."""
    for client in clients:
        client.close()
    if bridge.alive():
        bridge.kill()


@dataclass
class BridgedPeers:
    """The two official-SDK participants of a two-way scenario: `observer` records what
    reaches the room, `sender` sends through `publisher` (reliable packets on topic "up")."""

    observer: rtc.Room
    sender: rtc.Room
    publisher: RoomPublisher


@asynccontextmanager
async def bridged_peers(
    server: LiveKitServer,
    room: str,
    bridge: BridgeProc,
    down: Sink,
    up: Leg,
    *,
    also: Leg | None = None,
    sender_sees_bridge: bool = False,
) -> AsyncIterator[BridgedPeers]:
    """The common start of a two-way scenario: an "observer" (recording into `down`) and a
    "sender" (packets on topic "up", checked on `up` and `also`) join `room`, then `bridge`
    is started and awaited until ready and in the room as the observer sees it (and as the
    sender sees it, with `sender_sees_bridge`). Both leave the room on exit."""
    async with (
        sdk_room(server, room, "observer") as observer,
        sdk_room(server, room, "sender") as sender,
    ):
        RoomObserver(observer, down)
        publisher = RoomPublisher(sender, up, "up", also=also)
        bridge.start()
        await bridge.wait_ready()
        await bridge_in_room(observer)
        if sender_sees_bridge:
            await bridge_in_room(sender)
        yield BridgedPeers(observer, sender, publisher)


@asynccontextmanager
async def bridged_sender(
    server: LiveKitServer, room: str, bridge: BridgeProc, leg: Leg
) -> AsyncIterator[RoomPublisher]:
    """The start of a room → bus scenario: a "sender" (reliable packets on topic "up", checked
    on `leg`) joins `room`, then `bridge` is started and awaited until ready and in the room.
    The sender leaves the room on exit."""
    async with sdk_room(server, room, "sender") as sender:
        publisher = RoomPublisher(sender, leg, "up")
        bridge.start()
        await bridge.wait_ready()
        await bridge_in_room(sender)
        yield publisher


def device_load(publisher: MqttPublisher, topic: str, devices: int) -> Callable[[int], None]:
    """The MQTT side of a paced load: call `i` publishes as device `d = i % devices` to
    `topic` (a format string with `{d}`), keyed `d<d>`."""

    def device(i: int) -> None:
        d = i % devices
        publisher.publish(topic.format(d=d), f"d{d}")

    return device


def room_load(send: Callable[[str], Awaitable[None]]) -> Callable[[int], Awaitable[None]]:
    """The room side of a paced load: every call sends one packet keyed "sender"."""

    async def room_send(_i: int) -> None:
        await send("sender")

    return room_send


def two_way_load(
    rate: float,
    seconds: float,
    device: Callable[[int], None],
    room_send: Callable[[int], Awaitable[None]],
) -> asyncio.Future[tuple[int, int]]:
    """Both directions paced at `rate` a second for `seconds`, running until awaited."""
    return asyncio.gather(pace(rate, seconds, device), pace(rate, seconds, room_send))


async def create_topic(kafka: Kafka | str, topic: str, partitions: int = 1) -> None:
    """A topic with LogAppendTime: each record's timestamp is when the broker appended it."""
    bootstrap = kafka if isinstance(kafka, str) else kafka.bootstrap
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    topic,
                    num_partitions=partitions,
                    replication_factor=1,
                    topic_configs={"message.timestamp.type": "LogAppendTime"},
                )
            ]
        )
    finally:
        await admin.close()


async def read_kafka(
    bootstrap: str,
    topic: str,
    leg: Leg,
    until: Callable[[], bool],
    timeout: float,
    quiet: float = 15,
) -> None:
    """Read `topic` from the start into `leg` (delivery time: the record's LogAppendTime) until
    `until()`, or nothing new for `quiet` seconds, or `timeout` seconds."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while not until() and time.monotonic() < deadline and time.monotonic() - last < quiet:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    last = time.monotonic()
                    leg.deliver(record.value, record.timestamp / 1000)
        # Whatever else is there (duplicates after the last expected one).
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            for record in records:
                leg.deliver(record.value, record.timestamp / 1000)
    finally:
        await consumer.stop()


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def proc_counts(pid: int) -> tuple[int, int]:
    """(open file descriptors, threads) of `pid`."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0, 0
    return fds, threads


# --- faults -----------------------------------------------------------------------------------


@dataclass
class ProxiedKafka(Kafka):
    """A Kafka of its own whose advertised listener is `advertised_port` (a `FaultProxy` in
    front of it), so that every connection of a client, not only the bootstrap, goes through
    the proxy."""

    advertised_port: int = 0

    def prepare(self) -> None:
        super().prepare()
        props = self.workdir / "server.properties"
        text = props.read_text()
        text = re.sub(
            r"^advertised\.listeners=.*$",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.advertised_port}",
            text,
            flags=re.M,
        )
        props.write_text(text)


def process_ports(pid: int, proto: str = "udp") -> list[int]:
    """Local ports of `pid`'s sockets (`ss` inside the namespace; root sees every process)."""
    flag = "-Hunap" if proto == "udp" else "-Htnap"
    out = subprocess.run(["ss", flag], capture_output=True, text=True, check=True).stdout
    ports = set()
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        local = line.split()[3]
        ports.add(int(local.rsplit(":", 1)[1]))
    return sorted(ports)


class PacketFilter:
    """iptables rules in the test namespace's OUTPUT chain (everything between local addresses
    passes there, on `lo`), removed on `clear()`. Needs root inside the namespace."""

    def __init__(self) -> None:
        if shutil.which("iptables") is None:
            raise AssertionError("iptables not found: the packet faults need it (apt iptables)")
        if not os.environ.get("ROOMBUS_NETNS"):
            raise AssertionError("packet faults run only inside scripts/netns")
        self.rules: list[list[str]] = []

    def _add(self, rule: list[str]) -> None:
        done = subprocess.run(
            ["iptables", "-A", "OUTPUT", *rule], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise AssertionError(
                f"iptables refused {' '.join(rule)!r}: {done.stderr.strip()} (the packet faults"
                " need root in the test namespace, as scripts/netns gives when run as root)"
            )
        self.rules.append(rule)

    def loss(self, udp_ports: list[int], probability: float) -> None:
        """Random loss of `probability` on every UDP datagram from or to `udp_ports`."""
        for port in udp_ports:
            for way in ("--sport", "--dport"):
                self._add(
                    [
                        *("-p", "udp", way, str(port), "-m", "statistic", "--mode", "random"),
                        *("--probability", str(probability), "-j", "DROP"),
                    ]
                )

    def drop(self, proto: str, ports: list[int]) -> None:
        """Every packet from or to `ports` (a flap of those flows)."""
        for port in ports:
            for way in ("--sport", "--dport"):
                self._add(["-p", proto, way, str(port), "-j", "DROP"])

    def clear(self) -> None:
        for rule in self.rules:
            subprocess.run(["iptables", "-D", "OUTPUT", *rule], check=False, capture_output=True)
        self.rules = []


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (many container kernels do not)."""
    if shutil.which("tc") is None:
        return False
    probe = subprocess.run(
        ["tc", "qdisc", "add", "dev", "rb1", "root", "netem", "delay", "1ms"],
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        subprocess.run(["tc", "qdisc", "del", "dev", "rb1", "root"], check=False)
        return True
    return False
