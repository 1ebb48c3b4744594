"""Short scenarios of issue 8: a Kafka outage with the spool, and bridge SIGKILLs under load.

The bridge runs as its own process (`python -m bridge run`), the way users run it, so that it
can be killed with SIGKILL; the peers are the official SDK, a paho publisher and an aiokafka
consumer. Every message carries a sequence number; a message is *acknowledged* as in
bridge-expectations (f): a room packet once the bridge participant received it, an MQTT
message once the broker PUBACKed it to the publisher (the bridge holds a persistent QoS 1
session). The checks count lost (acknowledged, never delivered) and report duplicates.

LiveKit holds nothing for a participant that is not in the room, so what a peer sends while the
bridge is away is lost upstream of the bridge (best effort, documented): the room-to-bus
scenario pauses its publisher around the kill and resumes once the bridge is back in the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer
from livekit import rtc
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.e2e.conftest import KafkaPeer, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import LIVEKIT_API_KEY, LIVEKIT_API_SECRET, Kafka, LiveKitServer, Mosquitto

ROOT = Path(__file__).resolve().parents[2]


class BridgeProcess:
    """`python -m bridge run CONFIG` as a child process, its log in a file."""

    def __init__(self, config: Path, log: Path, *options: str) -> None:
        self.config = config
        self.log = log
        self.options = options  # of `run`, e.g. --watch
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts} =====\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", *self.options, str(self.config)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM: drain and exit; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def bridge_process(tmp_path: Path, yaml_text: str, *options: str) -> Iterator[BridgeProcess]:
    config = tmp_path / "roombus.yaml"
    config.write_text(yaml_text)
    bridge = BridgeProcess(config, tmp_path / "roombus.log", *options)
    bridge.start()
    try:
        yield bridge
    finally:
        with contextlib.suppress(Exception):
            bridge.stop()


def _head(livekit: LiveKitServer, room: str, state_dir: Path, extra: str = "") -> str:
    return f"""\
livekit:
  url: {livekit.url}
  api_key: {LIVEKIT_API_KEY}
  api_secret: {LIVEKIT_API_SECRET}
  identity: bridge
  rooms: [{room}]
bridge:
  state_dir: {state_dir}
  shutdown_timeout: 5
{extra}"""


async def _bridge_in_room(peer: rtc.Room, bridge: BridgeProcess, after: set[str]) -> str:
    """Wait until the bridge participant is in the room with a sid not in `after`; its sid."""

    def joined() -> bool:
        p = peer.remote_participants.get("bridge")
        return p is not None and p.sid not in after

    try:
        await eventually(joined, timeout=60, what="the bridge to join the room")
    except AssertionError:
        raise AssertionError(f"the bridge did not join; its log:\n{bridge.tail()}") from None
    return peer.remote_participants["bridge"].sid


async def test_room_to_kafka_survives_a_60s_kafka_outage_and_a_sigkill_with_the_spool(
    livekit_server: LiveKitServer,
    kafka: Kafka,
    kafka_peer: KafkaPeer,
    room_name: str,
    tmp_path: Path,
) -> None:
    topic = unique("seq")
    await kafka_peer.create_topic(topic)
    yaml_text = _head(
        livekit_server,
        room_name,
        tmp_path / "state",
        "  spool: {max_bytes: 104857600}\n",
    ) + (
        f"kafka:\n  main:\n    bootstrap_servers: [{kafka.bootstrap}]\n"
        "connectors:\n"
        "  - name: seq\n"
        '    from: {room: "*", packet: {topic: seq}}\n'
        f'    to: {{kafka: main, topic: "{topic}", key: "{{participant}}"}}\n'
    )
    rate = 200
    sent: list[int] = []
    async with sdk_peer(livekit_server, room_name, "producer") as producer:

        async def publish_for(seconds: float) -> None:
            start = time.monotonic()
            n = 0
            while (elapsed := time.monotonic() - start) < seconds:
                due = int(elapsed * rate) + 1
                while n < due:
                    seq = len(sent)
                    await producer.local_participant.publish_data(
                        json.dumps({"seq": seq}).encode(), reliable=True, topic="seq"
                    )
                    sent.append(seq)
                    n += 1
                await asyncio.sleep(0.005)

        with bridge_process(tmp_path, yaml_text) as bridge:
            sid = await _bridge_in_room(producer, bridge, set())
            await publish_for(5)
            kafka.stop()  # the outage: 60 s in all
            outage_started = time.monotonic()
            await publish_for(25)
            await asyncio.sleep(1)  # let the bridge take what is in flight to it
            bridge.kill()
            bridge.start()  # same config, same state dir: the spool is replayed
            await _bridge_in_room(producer, bridge, {sid})
            await publish_for(max(1.0, 60 - (time.monotonic() - outage_started)))
            kafka.start()
            received: dict[int, int] = {}
            consumer = AIOKafkaConsumer(
                topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest"
            )
            await consumer.start()
            try:
                deadline = time.monotonic() + 180
                while len(received) < len(sent) and time.monotonic() < deadline:
                    batch = await consumer.getmany(timeout_ms=1000)
                    for records in batch.values():
                        for record in records:
                            seq = json.loads(record.value)["seq"]
                            received[seq] = received.get(seq, 0) + 1
            finally:
                await consumer.stop()
            assert bridge.stop() == 0, bridge.tail()
    lost = sorted(set(sent) - set(received))
    duplicated = sum(c - 1 for c in received.values())
    print(
        f"room→kafka outage: sent {len(sent)}, delivered {len(received)}, lost {len(lost)},"
        f" duplicated {duplicated}"
    )
    assert lost == [], f"lost {len(lost)} of {len(sent)}: {lost[:20]}...\n{bridge.tail()}"


class Publisher:
    """MQTT devices (paho, its own thread): QoS 1 publishes, and which the broker PUBACKed."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"devices-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        # (seq, paho's handle): PUBACKed once `is_published()`. No on_publish callback: it runs
        # on paho's thread under paho's own lock, and a second lock here could deadlock.
        self._infos: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, seq: int) -> None:
        info = self.client.publish(topic, json.dumps({"seq": seq}).encode(), qos=1)
        self._infos.append((seq, info))

    @property
    def acked(self) -> set[int]:
        return {seq for seq, info in self._infos if info.is_published()}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_mqtt_to_room_loses_no_acknowledged_message_across_three_sigkills(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    yaml_text = _head(livekit_server, room_name, tmp_path / "state") + (
        f"mqtt:\n  bus:\n    host: 127.0.0.1\n    port: {mosquitto.port}\n"
        f"    client_id: roombus-kill-{uuid.uuid4().hex[:6]}\n"
        "connectors:\n"
        "  - name: telemetry\n"
        '    from: {mqtt: bus, topic: "dev/{device}/t", qos: 1}\n'
        f'    to: {{room: "{room_name}", packet: {{topic: "t/{{device}}"}}}}\n'
    )
    seen: dict[int, int] = {}
    rate, devices = 200, 20
    async with sdk_peer(livekit_server, room_name, "observer") as observer:

        def on_data(packet: rtc.DataPacket) -> None:
            seq = json.loads(packet.data)["seq"]
            seen[seq] = seen.get(seq, 0) + 1

        observer.on("data_received", on_data)
        publisher = Publisher(mosquitto.port)
        sent = 0
        try:
            with bridge_process(tmp_path, yaml_text) as bridge:
                sid = await _bridge_in_room(observer, bridge, set())
                sids = {sid}
                start = time.monotonic()
                kills_at = [4.0, 9.0, 14.0]
                while (elapsed := time.monotonic() - start) < 20:
                    due = int(elapsed * rate)
                    while sent < due:
                        publisher.publish(f"dev/d{sent % devices}/t", sent)
                        sent += 1
                    if kills_at and elapsed >= kills_at[0]:
                        kills_at.pop(0)
                        bridge.kill()
                        bridge.start()
                    await asyncio.sleep(0.005)
                await eventually(
                    lambda: len(publisher.acked) == sent, timeout=30, what="every PUBACK"
                )

                def all_seen() -> bool:
                    return publisher.acked <= seen.keys()

                with contextlib.suppress(AssertionError):
                    await eventually(all_seen, timeout=120, what="every acknowledged message")
                sids.add(await _bridge_in_room(observer, bridge, set()))
                assert bridge.stop() == 0, bridge.tail()
        finally:
            publisher.close()
    lost = sorted(publisher.acked - seen.keys())
    duplicated = sum(c - 1 for c in seen.values())
    print(
        f"mqtt→room kills: sent {sent}, acknowledged {len(publisher.acked)}, delivered"
        f" {len(seen)}, lost {len(lost)}, duplicated {duplicated}"
    )
    assert lost == [], f"lost {len(lost)} acknowledged messages: {lost[:20]}\n{bridge.tail()}"
