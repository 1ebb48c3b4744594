"""No configured secret ever reaches the output: a full debug run and `roombus check` (issue 9).

The bridge runs as users run it (``python -m bridge --log-level debug run cfg.yaml``) against
the real livekit-server and Mosquitto, with its secrets given as users give them: the LiveKit
API secret from a file (``${file:...}``, as Docker and Kubernetes mount secrets), the MQTT
password from the environment (``${VAR}``), and the participant metadata and MQTT client id from
files too (anything read through ``${file:...}`` is a secret, whatever field it lands in; the
client id is in paho's debug lines, so the log must be redacted, not merely silent). Traffic goes
both ways, one message is rejected, and the bridge stops with SIGTERM; then its whole output and
that of `roombus check` and `roombus routes` are searched for every secret.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from livekit import rtc

from tests.e2e.conftest import MqttPeer, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import LiveKitServer, Mosquitto

ROOT = Path(__file__).resolve().parents[2]
MQTT_PASSWORD = "mqtt-password-from-the-environment-7f3a"
METADATA = "metadata-from-a-secret-file-51c2"


def _config(livekit: LiveKitServer, mosquitto: Mosquitto, room: str, files: Path, ns: str) -> str:
    return f"""\
livekit:
  url: {livekit.url}
  api_key: {livekit.api_key}
  api_secret: ${{file:{files / "livekit-secret"}}}
  identity: bridge
  metadata: ${{file:{files / "metadata"}}}
  rooms: [{room}]
mqtt:
  bus:
    host: 127.0.0.1
    port: {mosquitto.port}
    client_id: ${{file:{files / "client-id"}}}
    username: roombus
    password: ${{RB_E2E_MQTT_PASSWORD}}
bridge:
  shutdown_timeout: 5
connectors:
  - name: telemetry-in
    from: {{mqtt: bus, topic: "{ns}/in/{{device}}"}}
    to: {{room: {room}, packet: {{topic: "telemetry.{{device}}"}}}}
  - name: json-in
    from: {{mqtt: bus, topic: "{ns}/json/{{device}}", format: json}}
    to: {{room: {room}, packet: {{topic: "json.{{device}}"}}}}
  - name: commands-out
    from: {{room: {room}, packet: {{topic: "command/{{device}}"}}}}
    to: {{mqtt: bus, topic: "{ns}/out/{{device}}"}}
"""


async def test_no_secret_in_a_debug_run_or_in_check_output(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path
) -> None:
    ns = unique("secrets")
    (tmp_path / "livekit-secret").write_text(livekit_server.api_secret + "\n")
    (tmp_path / "metadata").write_text(METADATA + "\n")
    client_id = f"bridge-{ns}"
    (tmp_path / "client-id").write_text(client_id)
    config = tmp_path / "cfg.yaml"
    config.write_text(_config(livekit_server, mosquitto, room_name, tmp_path, ns))
    secrets = [livekit_server.api_secret, MQTT_PASSWORD, METADATA, client_id]
    env = os.environ | {"RB_E2E_MQTT_PASSWORD": MQTT_PASSWORD}
    log = tmp_path / "roombus.log"

    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "bridge", "--log-level", "debug", "run", str(config)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    mqtt_peer = MqttPeer(mosquitto.port)
    try:
        async with sdk_peer(livekit_server, room_name, "dashboard") as peer:
            received: list[rtc.DataPacket] = []
            peer.on("data_received", received.append)
            await eventually(
                lambda: "bridge" in peer.remote_participants or proc.returncode is not None,
                timeout=60,
                what="the bridge to join the room",
            )
            assert proc.returncode is None, log.read_text(errors="replace")[-4000:]
            assert peer.remote_participants["bridge"].metadata == METADATA

            # bus -> room: publish until the bridge's subscription takes it.
            async def telemetry_arrived() -> None:
                while not any(p.topic == "telemetry.d1" for p in received):
                    await mqtt_peer.publish(f"{ns}/in/d1", b'{"t": 21.5}')
                    await asyncio.sleep(0.2)

            await asyncio.wait_for(telemetry_arrived(), 60)
            # A rejected message (not the JSON envelope) and a good one after it.
            for _ in range(3):
                await mqtt_peer.publish(f"{ns}/json/d2", b"not json")
            await mqtt_peer.publish(f"{ns}/json/d2", b'{"payload": "ok"}')
            await eventually(
                lambda: any(p.topic == "json.d2" for p in received),
                timeout=30,
                what="the JSON message in the room",
            )

            # room -> bus
            await mqtt_peer.subscribe(f"{ns}/out/#")

            async def command_arrived() -> None:
                while True:
                    await peer.local_participant.publish_data(
                        b"open", reliable=True, topic="command/valve-1"
                    )
                    try:
                        message = await mqtt_peer.next(timeout=1)
                    except TimeoutError:
                        continue
                    assert (message.topic, message.payload) == (f"{ns}/out/valve-1", b"open")
                    return

            await asyncio.wait_for(command_arrived(), 60)
    finally:
        mqtt_peer.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)

    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    # The run logged at debug, the bridge's lines only (no library chatter, no SDP dumps).
    debug_loggers = set(re.findall(r"^\S+ DEBUG (\S+): ", text, re.M))
    assert debug_loggers, text[-4000:]
    assert all(name.startswith("roombus") for name in debug_loggers), debug_loggers
    assert "a=ice-ufrag" not in text
    assert "json-in: rejected a message" in text
    assert re.search(r"DEBUG roombus\.mqtt\.paho: Sending CONNECT .*\*\*\*", text), text[-4000:]
    for secret in secrets:
        assert secret not in text, f"a secret is in the debug log: {secret[:4]}..."

    for command in (
        ["check", str(config)],
        ["routes", str(config), "--topic", f"{ns}/in/d1", "--payload", "x"],
        ["routes", str(config), "--event", "packet", "--room", room_name, "--topic", "command/x"],
    ):
        tool = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "bridge", *command],
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output = (await asyncio.wait_for(tool.communicate(), 60))[0].decode()
        assert tool.returncode == 0, output
        assert output.strip()
        for secret in secrets:
            assert secret not in output, f"{command[0]} shows a secret"
