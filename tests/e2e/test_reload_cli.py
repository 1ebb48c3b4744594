"""`roombus run` reloads on SIGHUP and, with ``--watch``, when its file changes.

The bridge runs as its own process, as users run it. SIGHUP used to kill it at once (the
default action): now it reloads, and the bridge stays in its room.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from livekit import rtc

from tests.e2e.conftest import MqttPeer, unique
from tests.e2e.test_crash_and_outage import BridgeProcess, _head, bridge_process
from tests.interop.conftest import eventually, sdk_peer
from tests.services import LiveKitServer, Mosquitto


def _config(
    livekit: LiveKitServer, mosquitto: Mosquitto, room: str, prefix: str, state: Path
) -> str:
    return (
        _head(livekit, room, state)
        + f"""\
mqtt:
  bus: {{host: 127.0.0.1, port: {mosquitto.port}, client_id: {prefix}}}
connectors:
  - name: first
    from: {{mqtt: bus, topic: "{prefix}/first"}}
    to: {{room: "{room}", packet: {{topic: first}}}}
"""
    )


SECOND = """\
  - name: second
    from: {{mqtt: bus, topic: "{prefix}/second"}}
    to: {{room: "{room}", packet: {{topic: second}}}}
"""


async def _applied(bridge: BridgeProcess, times: int) -> None:
    def seen() -> bool:
        return bridge.log.read_text(errors="replace").count(": applied: ") >= times

    try:
        await eventually(seen, timeout=30, what=f"reload number {times} applied")
    except AssertionError:
        raise AssertionError(f"not reloaded; the bridge's log:\n{bridge.tail()}") from None


async def _route_works(mqtt: MqttPeer, got: asyncio.Queue[rtc.DataPacket], topic: str) -> None:
    payload = unique("m").encode()
    await mqtt.publish(topic, payload)
    while True:
        packet = await asyncio.wait_for(got.get(), 15)
        if packet.data == payload:
            return


async def test_sighup_reloads_and_watch_reloads_on_change(
    livekit_server: LiveKitServer,
    mosquitto: Mosquitto,
    mqtt_peer: MqttPeer,
    room_name: str,
    tmp_path: Path,
) -> None:
    prefix = unique("cli-reload")
    text = _config(livekit_server, mosquitto, room_name, prefix, tmp_path / "state")
    second = SECOND.format(prefix=prefix, room=room_name)
    async with sdk_peer(livekit_server, room_name, "dash") as dash:
        got: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        dash.on("data_received", got.put_nowait)
        with bridge_process(tmp_path, text) as bridge:
            await eventually(lambda: "bridge" in dash.remote_participants, timeout=60)
            sid = dash.remote_participants["bridge"].sid
            await _route_works(mqtt_peer, got, f"{prefix}/first")
            # Steady state at INFO logs nothing per message.
            lines = len(bridge.log.read_text(errors="replace").splitlines())
            for _ in range(30):
                await _route_works(mqtt_peer, got, f"{prefix}/first")
            assert len(bridge.log.read_text(errors="replace").splitlines()) == lines, bridge.tail()

            # SIGHUP: a bad file is refused with its location, the bridge keeps running...
            bridge.config.write_text(text + "  - name: [oops\n")
            assert bridge.proc is not None
            bridge.proc.send_signal(signal.SIGHUP)
            await eventually(
                lambda: "refused, still running" in bridge.log.read_text(errors="replace"),
                what="the bad file refused",
            )
            assert str(bridge.config) in bridge.log.read_text()
            # ...and a good one is applied.
            bridge.config.write_text(text + second)
            bridge.proc.send_signal(signal.SIGHUP)
            await _applied(bridge, 1)
            await _route_works(mqtt_peer, got, f"{prefix}/second")
            assert bridge.proc.poll() is None
            assert dash.remote_participants["bridge"].sid == sid  # never left the room
            assert bridge.stop() == 0

    watched = tmp_path / "watched"
    watched.mkdir()
    async with sdk_peer(livekit_server, room_name, "dash2") as dash:
        got = asyncio.Queue()
        dash.on("data_received", got.put_nowait)
        with bridge_process(watched, text, "--watch") as bridge:
            await eventually(lambda: "bridge" in dash.remote_participants, timeout=60)
            await _route_works(mqtt_peer, got, f"{prefix}/first")
            # Replaced, the way editors and ConfigMaps do it: a new file renamed over the old.
            fresh = watched / "roombus.yaml.new"
            fresh.write_text(text + second)
            fresh.replace(bridge.config)
            await _applied(bridge, 1)
            await _route_works(mqtt_peer, got, f"{prefix}/second")
            assert bridge.stop() == 0
