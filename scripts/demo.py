"""The roombus demo: the bridge's main job end to end, on local services, in about a minute.

Started by `scripts/demo` inside the private test network (WebRTC needs a non-loopback
interface). It starts livekit-server, Mosquitto and Kafka, runs `roombus run
config.example.yaml` as a separate process, and plays two parties:

* a simulated device (MQTT) publishing telemetry on devices/berlin/d1/telemetry and printing the
  commands it receives on devices/berlin/d1/commands;
* a dashboard participant in room plant-berlin (the official LiveKit SDK) printing the telemetry
  that arrives, sending a command back to the device, chatting (to Kafka) and setting an
  attribute (to a retained MQTT topic).

It checks that each leg worked, stops the bridge with SIGTERM (it must drain and exit 0) and
prints a summary; the exit status is 0 only if everything arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer
from livekit import api, rtc
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services import Kafka, LiveKitServer, Mosquitto, ServiceError  # noqa: E402

ROOM = "plant-berlin"
# Ports of the demo's own servers (not the tests' defaults, so both can run at once).
LIVEKIT_PORT, LIVEKIT_UDP, LIVEKIT_TURN = 7890, 7892, 3488
MQTT_PORT, KAFKA_PORT, KAFKA_CONTROLLER = 1893, 9192, 9193


def say(who: str, text: str) -> None:
    """One line of the demo's story."""
    print(f"{time.strftime('%H:%M:%S')} [{who}] {text}", flush=True)


class Device:
    """A simulated MQTT device (paho with its own thread)."""

    def __init__(self, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.commands: asyncio.Queue[str] = asyncio.Queue()
        self.states: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.loop = loop
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="device-d1", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("devices/berlin/d1/commands", qos=1)
        self.client.subscribe(f"rooms/{ROOM}/participants/+/attributes/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        text = msg.payload.decode(errors="replace")
        if msg.topic.endswith("/commands"):
            self.loop.call_soon_threadsafe(self.commands.put_nowait, text)
        else:
            self.loop.call_soon_threadsafe(self.states.put_nowait, (msg.topic, text))

    def publish_telemetry(self, seq: int) -> None:
        """Publish one reading."""
        reading = {"seq": seq, "temp_c": round(20 + random.random() * 5, 2)}  # noqa: S311
        self.client.publish("devices/berlin/d1/telemetry", json.dumps(reading), qos=1)

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


async def pump_output(stream: asyncio.StreamReader, who: str, quiet: bool) -> None:
    """Show the bridge's log lines (warnings and errors always; everything unless quiet)."""
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        if not quiet or " WARNING " in text or " ERROR " in text:
            say(who, text)


async def run(quiet: bool) -> int:
    """The demo's story; returns the exit status."""
    workdir = Path(tempfile.mkdtemp(prefix="roombus-demo-"))
    livekit = LiveKitServer(
        name="livekit-server",
        workdir=workdir / "livekit",
        port=LIVEKIT_PORT,
        udp_port=LIVEKIT_UDP,
        turn_port=LIVEKIT_TURN,
    )
    broker = Mosquitto(name="mosquitto", workdir=workdir / "mosquitto", port=MQTT_PORT)
    kafka = Kafka(
        name="kafka", workdir=workdir / "kafka", port=KAFKA_PORT, controller_port=KAFKA_CONTROLLER
    )
    services = [livekit, broker, kafka]
    bridge: asyncio.subprocess.Process | None = None
    device: Device | None = None
    dashboard = rtc.Room()
    results: dict[str, bool] = dict.fromkeys(
        ["telemetry reached the dashboard", "command reached the device", "chat reached Kafka",
         "attribute reached MQTT", "bridge drained and exited 0"], False
    )  # fmt: skip
    try:
        for service in services:
            say("demo", f"starting {service.name}")
            await asyncio.to_thread(service.start)
        env = dict(
            os.environ,
            LIVEKIT_URL=livekit.url,
            LIVEKIT_API_KEY=livekit.api_key,
            LIVEKIT_API_SECRET=livekit.api_secret,
            MQTT_HOST="127.0.0.1",
            MQTT_PORT=str(MQTT_PORT),
            KAFKA_BOOTSTRAP=kafka.bootstrap,
        )
        roombus = Path(sys.executable).parent / "roombus"
        say("demo", f"starting the bridge: {roombus.name} run config.example.yaml")
        bridge = await asyncio.create_subprocess_exec(
            str(roombus), "run", str(ROOT / "config.example.yaml"),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert bridge.stderr is not None
        pump = asyncio.create_task(pump_output(bridge.stderr, "bridge", quiet))

        # The dashboard: an official-SDK participant in the plant's room.
        telemetry: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        dashboard.on("data_received", telemetry.put_nowait)
        token = (
            api.AccessToken(livekit.api_key, livekit.api_secret)
            .with_identity("dashboard")
            .with_grants(
                api.VideoGrants(
                    room_join=True, room=ROOM, can_publish_data=True, can_update_own_metadata=True
                )
            )
            .to_jwt()
        )
        await dashboard.connect(livekit.url, token)
        say("dashboard", f"joined {ROOM}; waiting for the bridge")
        deadline = time.monotonic() + 60
        while "roombus" not in dashboard.remote_participants:
            if time.monotonic() > deadline or bridge.returncode is not None:
                say("demo", "the bridge did not join the room")
                return 1
            await asyncio.sleep(0.2)
        say("dashboard", "the bridge is in the room")

        device = Device(MQTT_PORT, asyncio.get_running_loop())
        say("device d1", "connected to MQTT; publishing telemetry every 0.5 s")
        consumer = AIOKafkaConsumer(
            "livekit.chat", bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            for seq in range(1, 7):
                device.publish_telemetry(seq)
                await asyncio.sleep(0.5)
            for _ in range(3):
                packet = await asyncio.wait_for(telemetry.get(), 20)
                say("dashboard", f"{packet.topic}: {packet.data.decode()}")
            results["telemetry reached the dashboard"] = True

            command = json.dumps({"fan": "high"})
            say("dashboard", f"sending command/d1 {command}")
            await dashboard.local_participant.publish_data(command, topic="command/d1")
            received = await asyncio.wait_for(device.commands.get(), 20)
            say("device d1", f"command received: {received}")
            results["command reached the device"] = received == command

            say("dashboard", "chatting: 'fan set to high'")
            await dashboard.local_participant.send_text("fan set to high", topic="chat")
            record = await asyncio.wait_for(consumer.getone(), 30)
            say(
                "kafka livekit.chat",
                f"key={(record.key or b'').decode()} value={(record.value or b'').decode()}",
            )
            results["chat reached Kafka"] = b"fan set to high" in (record.value or b"")

            say("dashboard", "setting attribute status=watching")
            await dashboard.local_participant.set_attributes({"status": "watching"})
            topic, value = await asyncio.wait_for(device.states.get(), 20)
            say("mqtt (retained)", f"{topic} = {value}")
            results["attribute reached MQTT"] = value == "watching"
        finally:
            await consumer.stop()

        say("demo", "stopping the bridge with SIGTERM")
        bridge.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(bridge.wait(), 60)
        await pump
        results["bridge drained and exited 0"] = code == 0
    except (TimeoutError, ServiceError) as exc:
        say("demo", f"failed: {exc or type(exc).__name__}")
    finally:
        if device is not None:
            device.close()
        await dashboard.disconnect()
        if bridge is not None and bridge.returncode is None:
            bridge.kill()
            await bridge.wait()
        for service in reversed(services):
            await asyncio.to_thread(service.stop)
    print()
    for what, ok in results.items():
        print(f"  {'ok  ' if ok else 'FAIL'}  {what}")
    ok = all(results.values())
    print(f"\ndemo: {'OK' if ok else 'FAILED'} (logs in {workdir})")
    return 0 if ok else 1


def main() -> int:
    """Run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quiet", action="store_true", help="show only the bridge's warnings")
    args = parser.parse_args()
    if not os.environ.get("ROOMBUS_NETNS"):
        print("demo: run it with scripts/demo (it needs the private test network)", file=sys.stderr)
        return 2
    return asyncio.run(run(args.quiet))


if __name__ == "__main__":
    threading.current_thread().name = "demo"
    raise SystemExit(main())
