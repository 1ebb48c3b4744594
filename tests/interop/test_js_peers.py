"""Our participant and the bridge against the official JavaScript SDKs, through livekit-server.

Every test runs once per JS peer (`tests/interop/js_peers.py`): ``browser`` is livekit-client in
Debian's headless Chromium, ``node`` is @livekit/rtc-node (LiveKit's Rust core) in a Node
process; both run `tests/js/peer_core.mjs`. Legs: data packets (reliable and lossy, topic,
destinations) both ways, text streams (whole and incremental) both ways, byte streams by content
hash both ways, attributes and metadata both ways, RPC both ways (success, application error
with code, message and data, 1400, 1502, 1504 for a v1 caller), and through the whole bridge:
packets and text streams to and from MQTT, attributes to retained MQTT, and the bus deadline a
room-to-bus RPC route gives its backend for each kind of caller.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.room.errors import RpcError
from bridge.room.events import DataReceived
from bridge.room.room import Room, RoomOptions
from bridge.room.rpc import RpcInvocationData
from bridge.room.state import ParticipantAttributesChanged, ParticipantMetadataChanged
from bridge.room.types import DataPacketKind
from tests.e2e.conftest import MqttPeer, bridge_yaml, run_bridge
from tests.interop.conftest import eventually, our_peer
from tests.interop.js_peers import PEERS, JsPeer, js_peer
from tests.services import LiveKitServer, Mosquitto

TEXT = "héllo → 世界 🎉 ñ"
# ~60 KB of 1- to 4-byte characters: several stream chunks, split inside characters.
BIG_TEXT = "".join(random.Random(11).choices("aü€🎉ß中", k=24_000))
BLOB = random.Random(5).randbytes(300 * 1024)


@pytest.fixture(params=PEERS)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


async def all_present(js: JsPeer, *ours: Room) -> None:
    """Wait until each side sees every other one."""
    names = {room.local_identity for room in ours}

    def sees_js(room: Room) -> Callable[[], bool]:
        return lambda: js.identity in room.remote_participants

    for room in ours:
        await eventually(sees_js(room), what=f"{room.local_identity} to see {js.identity}")
    deadline = time.monotonic() + 15
    while not names <= set(await js.run("remotes")):
        assert time.monotonic() < deadline, f"{js.kind} peer never saw {names}"
        await asyncio.sleep(0.05)


class Packets:
    """Every data packet one of our rooms receives, in order."""

    def __init__(self, room: Room) -> None:
        self.got: list[DataReceived] = []
        room.on(DataReceived, self.got.append)

    def data(self, *, reliable: bool | None = None) -> list[bytes]:
        return [
            e.packet.data
            for e in self.got
            if reliable is None or (e.packet.kind == DataPacketKind.KIND_RELIABLE) == reliable
        ]


class Streams:
    """A stream handler for our room: reads each stream piece by piece into `done`."""

    def __init__(self) -> None:
        self.done: asyncio.Queue[tuple[str, Any, list[Any]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, reader: Any, sender: str) -> None:
        async def read() -> None:
            pieces = [piece async for piece in reader]
            await self.done.put((sender, reader.info, pieces))

        task = asyncio.get_running_loop().create_task(read())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def next(self, timeout: float = 30.0) -> tuple[str, Any, list[Any]]:
        return await asyncio.wait_for(self.done.get(), timeout)


# --------------------------------------------------------------------------------------------
# Our participant against a JS peer
# --------------------------------------------------------------------------------------------


async def test_packets_both_ways(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, kind: str
) -> None:
    """Reliable and lossy packets with topics; destinations reach only the addressed ones."""
    async with (
        our_peer(livekit_server, room_name, "ours") as ours,
        our_peer(livekit_server, room_name, "other") as other,
        js_peer(kind, livekit_server, room_name, "js", tmp_path) as js,
    ):
        await all_present(js, ours, other)
        to_ours, to_other = Packets(ours), Packets(other)
        lp = ours.local_participant

        # ours -> js: addressed to js, addressed to someone else, binary, then an end marker
        # on the same ordered reliable channel.
        await lp.publish_data(b"\x00\xffours-reliable", topic="r", destination_identities=["js"])
        await lp.publish_data(b"for-other", topic="r", destination_identities=["other"])
        await lp.publish_data("ours-end", topic="end")
        got = await js.next_event("data", lambda e: e["topic"] == "r")
        assert (got["from"], unb64(got["data"]), got["reliable"]) == (
            "ours",
            b"\x00\xffours-reliable",
            True,
        )
        end = await js.next_event("data", lambda e: e["topic"] == "end")
        assert unb64(end["data"]) == b"ours-end"
        assert [unb64(e["data"]) for e in js.events_of("data")] == []  # never "for-other"
        await eventually(lambda: to_other.data() == [b"for-other", b"ours-end"], what="other")

        # ours -> js lossy: a lossy packet may be lost, so send until one arrives (bounded).
        lossy: dict[str, Any] | None = None
        for i in range(50):
            await lp.publish_data(
                f"lossy-{i}", topic="l", reliable=False, destination_identities=["js"]
            )
            try:
                lossy = await js.next_event("data", lambda e: e["topic"] == "l", timeout=0.5)
                break
            except AssertionError:
                continue
        assert lossy is not None, "no lossy packet from ours arrived in 50 tries"
        assert lossy["reliable"] is False and unb64(lossy["data"]).startswith(b"lossy-")

        # js -> ours: to ours only, to other only, then to everyone.
        await js.run(
            "publish",
            data=b64(b"js-reliable \xe2\x9c\x93"),
            reliable=True,
            topic="jr",
            destinations=["ours"],
        )
        await js.run(
            "publish", data=b64(b"js-for-other"), reliable=True, topic="jr", destinations=["other"]
        )
        await js.run("publish", data=b64(b"js-end"), reliable=True, topic="jend")
        await eventually(lambda: b"js-end" in to_ours.data(), what="js-end at ours")
        mine = [e.packet for e in to_ours.got]
        assert [(p.data, p.topic, p.participant_identity, p.kind) for p in mine] == [
            (b"js-reliable \xe2\x9c\x93", "jr", "js", DataPacketKind.KIND_RELIABLE),
            (b"js-end", "jend", "js", DataPacketKind.KIND_RELIABLE),
        ]
        await eventually(
            lambda: to_other.data()[2:] == [b"js-for-other", b"js-end"], what="other from js"
        )

        # js -> ours lossy, bounded as above.
        for i in range(50):
            await js.run(
                "publish",
                data=b64(f"js-lossy-{i}".encode()),
                reliable=False,
                topic="jl",
                destinations=["ours"],
            )
            try:
                await eventually(lambda: bool(to_ours.data(reliable=False)), timeout=0.5)
                break
            except AssertionError:
                continue
        lossy_in = [e.packet for e in to_ours.got if e.packet.kind == DataPacketKind.KIND_LOSSY]
        assert lossy_in, "no lossy packet from js arrived in 50 tries"
        assert lossy_in[0].topic == "jl" and lossy_in[0].data.startswith(b"js-lossy-")
        assert not [e for e in to_other.got if e.packet.topic == "jl"]


async def test_text_streams_both_ways(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, kind: str
) -> None:
    """Whole texts (short and ~60 KB) and incremental writers, both ways, UTF-8 intact."""
    to_ours = Streams()
    async with (
        our_peer(
            livekit_server,
            room_name,
            "ours",
            setup=lambda room: room.register_text_stream_handler("chat", to_ours),
        ) as ours,
        js_peer(kind, livekit_server, room_name, "js", tmp_path) as js,
    ):
        await all_present(js, ours)
        await js.run("handle_text", topic="chat")
        lp = ours.local_participant

        # ours -> js
        await lp.send_text(TEXT, topic="chat")
        got = await js.next_event("text")
        assert (got["from"], got["topic"], got["text"]) == ("ours", "chat", TEXT)
        await lp.send_text(BIG_TEXT, topic="chat")
        got = await js.next_event("text")
        assert got["text"] == BIG_TEXT
        pieces = ["Hel", "lo, ", "wörld ", "🎉", "!"]
        async with await lp.stream_text(topic="chat", attributes={"k": "v"}) as writer:
            for piece in pieces:
                await writer.write(piece)
        got = await js.next_event("text")
        assert (got["text"], got["attributes"]) == ("".join(pieces), {"k": "v"})
        assert got["chunks"] == len(pieces), got  # the JS reader saw each write as a chunk

        # js -> ours
        await js.run("send_text", text=TEXT, topic="chat")
        sender, info, parts = await to_ours.next()
        assert (sender, info.topic, "".join(parts)) == ("js", "chat", TEXT)
        await js.run("send_text", text=BIG_TEXT, topic="chat")
        sender, info, parts = await to_ours.next()
        assert "".join(parts) == BIG_TEXT
        chunks = ["Str", "eam", "ed ", "tö", "kens 🎉"]
        await js.run("stream_text", chunks=chunks, topic="chat", attributes={"a": "b"})
        sender, info, parts = await to_ours.next()
        assert (sender, "".join(parts), dict(info.attributes)) == (
            "js",
            "".join(chunks),
            {"a": "b"},
        )
        assert parts == chunks  # one piece per JS write: incremental, not buffered


async def test_byte_streams_by_hash(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, kind: str
) -> None:
    """300 KB of random bytes each way, compared by SHA-256, size, name and topic."""
    to_ours = Streams()
    digest = hashlib.sha256(BLOB).hexdigest()
    async with (
        our_peer(
            livekit_server,
            room_name,
            "ours",
            setup=lambda room: room.register_byte_stream_handler("blobs", to_ours),
        ) as ours,
        js_peer(kind, livekit_server, room_name, "js", tmp_path) as js,
    ):
        await all_present(js, ours)
        await js.run("handle_bytes", topic="blobs")

        await ours.local_participant.send_bytes(BLOB, name="ours.bin", topic="blobs")
        got = await js.next_event("bytes", timeout=60)
        assert (got["from"], got["topic"], got["name"], got["size"], got["sha256"]) == (
            "ours",
            "blobs",
            "ours.bin",
            len(BLOB),
            digest,
        )

        sent = await js.run("send_bytes", data=b64(BLOB), name="js.bin", topic="blobs")
        assert sent["sha256"] == digest  # the peer got the bytes the test meant
        sender, info, parts = await to_ours.next(timeout=60)
        data = b"".join(parts)
        assert (sender, info.name, info.topic, len(data)) == ("js", "js.bin", "blobs", len(BLOB))
        assert hashlib.sha256(data).hexdigest() == digest


async def test_attributes_both_ways(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, kind: str
) -> None:
    """Token attributes, set and delete ("" deletes), seen by the other side both ways."""
    changes: list[ParticipantAttributesChanged] = []

    def setup(room: Room) -> None:
        room.on(ParticipantAttributesChanged, changes.append)

    async with (
        our_peer(
            livekit_server,
            room_name,
            "ours",
            setup=setup,
        ) as ours,
        js_peer(
            kind, livekit_server, room_name, "js", tmp_path, attributes={"initial": "yes"}
        ) as js,
    ):
        await all_present(js, ours)
        assert dict(ours.remote_participants["js"].attributes) == {"initial": "yes"}

        await ours.local_participant.set_attributes({"role": "bridge", "zone": "berlin"})
        got = await js.next_event("attributes", lambda e: e["identity"] == "ours")
        assert got["attributes"] == {"role": "bridge", "zone": "berlin"}
        await ours.local_participant.set_attributes({"zone": ""})
        got = await js.next_event("attributes", lambda e: e["identity"] == "ours")
        assert (got["changed"], got["attributes"]) == ({"zone": ""}, {"role": "bridge"})
        assert await js.run("attributes_of", identity="ours") == {"role": "bridge"}

        await js.run("set_attributes", attributes={"mood": "ok", "x": "1"})
        await eventually(
            lambda: (
                dict(ours.remote_participants["js"].attributes)
                == {"initial": "yes", "mood": "ok", "x": "1"}
            ),
            what="js's attributes at ours",
        )
        await js.run("set_attributes", attributes={"x": ""})
        await eventually(
            lambda: (
                dict(ours.remote_participants["js"].attributes) == {"initial": "yes", "mood": "ok"}
            ),
            what="js's deleted attribute at ours",
        )
        remote = [c for c in changes if c.identity == "js"]
        assert [c.changed for c in remote] == [{"mood": "ok", "x": "1"}, {"x": ""}]


async def test_metadata_both_ways(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, kind: str
) -> None:
    """Participant metadata set on each side is seen by the other (event and state)."""
    changes: list[ParticipantMetadataChanged] = []

    def setup(room: Room) -> None:
        room.on(ParticipantMetadataChanged, changes.append)

    async with (
        our_peer(livekit_server, room_name, "ours", setup=setup) as ours,
        js_peer(kind, livekit_server, room_name, "js", tmp_path) as js,
    ):
        await all_present(js, ours)
        await ours.local_participant.set_metadata('{"role": "bridge"}')
        got = await js.next_event("metadata", lambda e: e["identity"] == "ours")
        assert got["metadata"] == '{"role": "bridge"}'
        assert await js.run("metadata_of", identity="ours") == '{"role": "bridge"}'

        # (rtc-node's updateMetadata resolves before its own participant shows the change.)
        await js.run("set_metadata", metadata="js: ünïcode ✓")
        await eventually(
            lambda: ours.remote_participants["js"].metadata == "js: ünïcode ✓",
            what="js's metadata at ours",
        )
        remote = [c for c in changes if c.identity == "js"]
        assert [(c.old, c.new) for c in remote] == [("", "js: ünïcode ✓")]


async def test_rpc_js_calls_ours(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, kind: str
) -> None:
    """A JS caller gets our answer, our error (code, message, data), 1400 and 1502."""
    seen: dict[str, float] = {}

    def setup(room: Room) -> None:
        lp = room.local_participant

        async def echo(data: RpcInvocationData) -> str:
            seen[data.payload[:20]] = data.response_timeout
            return "ours:" + data.payload

        async def fail(data: RpcInvocationData) -> str:
            raise RpcError(4002, "ours says no", '{"a": 1}')

        async def slow(data: RpcInvocationData) -> str:
            await asyncio.sleep(30)
            return "too late"

        lp.register_rpc_method("ours.echo", echo)
        lp.register_rpc_method("ours.fail", fail)
        lp.register_rpc_method("ours.slow", slow)

    big = "".join(random.Random(3).choices("aü€🎉", k=30_000))  # ~75 KB: over RPC v1's limit
    async with (
        our_peer(livekit_server, room_name, "ours", setup=setup) as ours,
        js_peer(kind, livekit_server, room_name, "js", tmp_path) as js,
    ):
        await all_present(js, ours)

        async def call(method: str, payload: str, timeout_ms: int = 10_000) -> Any:
            return await js.run(
                "rpc", destination="ours", method=method, payload=payload, timeout_ms=timeout_ms
            )

        echo, large, fail, missing, slow = await asyncio.gather(
            call("ours.echo", TEXT),
            call("ours.echo", big),
            call("ours.fail", ""),
            call("ours.nope", ""),
            call("ours.slow", "", timeout_ms=2_000),  # livekit-client waits at least 8 s
        )
        assert echo.get("ok") == "ours:" + TEXT, echo
        assert large.get("ok") == "ours:" + big, {k: str(v)[:80] for k, v in large.items()}
        assert (fail["code"], fail["message"], fail["data"]) == (4002, "ours says no", '{"a": 1}')
        assert missing["code"] == RpcError.UNSUPPORTED_METHOD, missing
        assert slow["code"] == RpcError.RESPONSE_TIMEOUT, slow
        # What each SDK announces for a 10 s wait: the Rust core max(T - 7 s, 1 s), JS max(T, 8 s).
        assert seen[TEXT[:20]] == {"node": 3.0, "browser": 10.0}[kind]


async def test_rpc_ours_calls_js(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, kind: str
) -> None:
    """Our caller gets the JS answer, its error (code, message, data), 1400 and 1502."""
    async with (
        our_peer(livekit_server, room_name, "ours") as ours,
        js_peer(kind, livekit_server, room_name, "js", tmp_path) as js,
    ):
        await all_present(js, ours)
        await js.run("serve_rpc")
        lp = ours.local_participant

        async def call(method: str, payload: str, timeout: float = 10.0) -> str | RpcError:
            try:
                return await lp.perform_rpc(
                    destination_identity="js",
                    method=method,
                    payload=payload,
                    response_timeout=timeout,
                )
            except RpcError as exc:
                return exc

        big = "".join(random.Random(4).choices("aü€🎉", k=30_000))
        echo, large, fail, missing, slow = await asyncio.gather(
            call("js.echo", TEXT),
            call("js.echo", big),
            call("js.fail", ""),
            call("js.nope", ""),
            call("js.slow", "", timeout=2.0),
        )
        assert echo == "js:" + TEXT
        assert large == "js:" + big
        assert isinstance(fail, RpcError)
        assert (fail.code, fail.message, fail.data) == (4001, "js says no", '{"why": "busy"}')
        assert isinstance(missing, RpcError) and missing.code == RpcError.UNSUPPORTED_METHOD
        assert isinstance(slow, RpcError) and slow.code == RpcError.RESPONSE_TIMEOUT
        invocation = await js.next_event("rpc", lambda e: e["payload"] == TEXT)
        assert (invocation["caller"], invocation["method"]) == ("ours", "js.echo")


async def test_rpc_response_too_large_for_a_v1_caller(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, kind: str
) -> None:
    """A caller that speaks only RPC v1 (``client_protocol`` 0) gets 1504 from livekit-client
    for a response over 15 KiB; the Rust core (rtc-node) sends it whole anyway, and we take it.
    The same call from a v2 caller gets the whole response (as a stream) from both."""
    v1 = RoomOptions(client_protocol=0)
    async with (
        our_peer(livekit_server, room_name, "ours-v1", options=v1) as old,
        our_peer(livekit_server, room_name, "ours-v2") as new,
        js_peer(kind, livekit_server, room_name, "js", tmp_path) as js,
    ):
        await all_present(js, old, new)
        await js.run("serve_rpc")

        async def call(room: Room, size: int) -> str | RpcError:
            try:
                return await room.local_participant.perform_rpc(
                    destination_identity="js", method="js.big", payload=str(size)
                )
            except RpcError as exc:
                return exc

        small, big_v1, big_v2 = await asyncio.gather(
            call(old, 1_000), call(old, 20_000), call(new, 20_000)
        )
        assert small == "x" * 1_000
        if kind == "browser":
            assert isinstance(big_v1, RpcError), str(big_v1)[:80]
            assert big_v1.code == RpcError.RESPONSE_PAYLOAD_TOO_LARGE
        else:
            assert big_v1 == "x" * 20_000
        assert big_v2 == "x" * 20_000


# --------------------------------------------------------------------------------------------
# The whole bridge with a JS peer
# --------------------------------------------------------------------------------------------


@asynccontextmanager
async def mqtt_peer(port: int) -> AsyncIterator[MqttPeer]:
    peer = MqttPeer(port)
    try:
        yield peer
    finally:
        peer.client.loop_stop()
        peer.client.disconnect()


async def next_message(peer: MqttPeer, topic: str, timeout: float = 20.0) -> mqtt.MQTTMessage:
    """The next MQTT message on `topic` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no MQTT message on {topic} within {timeout:.0f} s"
        try:
            message = await asyncio.wait_for(peer.messages.get(), left)
        except TimeoutError:
            continue
        if message.topic == topic:
            return message


async def test_bridge_with_js_peer(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path, kind: str
) -> None:
    """JS packets and text streams reach MQTT, MQTT reaches the JS peer, attributes are retained."""
    body = f"""\
connectors:
  - name: up
    from: {{room: "{room_name}", packet: {{topic: "up"}}}}
    to: {{mqtt: bus, topic: "js/{room_name}/up/{{participant}}"}}
  - name: chat
    from: {{room: "{room_name}", text_stream: {{topic: chat}}}}
    to: {{mqtt: bus, topic: "js/{room_name}/chat/{{participant}}"}}
  - name: state
    from: {{room: "{room_name}", attributes: {{keys: "*"}}}}
    to: {{mqtt: bus, topic: "js/{room_name}/attr/{{participant}}/{{key}}", retain: true}}
  - name: down
    from: {{mqtt: bus, topic: "js/{room_name}/down/{{who}}", qos: 1}}
    to: {{room: "{room_name}", packet: {{topic: "down", destinations: ["{{who}}"]}}}}
"""
    async with AsyncExitStack() as stack:
        bus = await stack.enter_async_context(mqtt_peer(mosquitto.port))
        await bus.subscribe(f"js/{room_name}/+/#")
        await stack.enter_async_context(
            run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body))
        )
        js = await stack.enter_async_context(
            js_peer(kind, livekit_server, room_name, "jsdev", tmp_path)
        )
        deadline = time.monotonic() + 15
        while "bridge" not in await js.run("remotes"):
            assert time.monotonic() < deadline, "the JS peer never saw the bridge"
            await asyncio.sleep(0.05)

        await js.run("publish", data=b64(b'{"t": 21.5}'), reliable=True, topic="up")
        message = await next_message(bus, f"js/{room_name}/up/jsdev")
        assert message.payload == b'{"t": 21.5}'

        await js.run("stream_text", chunks=["hello ", "from ", "JS ✓"], topic="chat")
        message = await next_message(bus, f"js/{room_name}/chat/jsdev")
        assert message.payload.decode() == "hello from JS ✓"

        await js.run("set_attributes", attributes={"mode": "auto"})
        message = await next_message(bus, f"js/{room_name}/attr/jsdev/mode")
        assert (message.payload, message.retain) == (b"auto", False)  # live delivery
        retained = await bus_retained(mosquitto.port, f"js/{room_name}/attr/jsdev/mode")
        assert retained == b"auto"

        bus.client.publish(f"js/{room_name}/down/jsdev", b"open valve", qos=1)
        got = await js.next_event("data", lambda e: e["topic"] == "down")
        assert (got["from"], unb64(got["data"]), got["reliable"]) == ("bridge", b"open valve", True)


async def bus_retained(port: int, topic: str) -> bytes:
    """The retained message on `topic`, read by a fresh subscriber."""
    async with mqtt_peer(port) as fresh:
        await fresh.subscribe(topic)
        message = await next_message(fresh, topic, timeout=10)
        assert message.retain
        return bytes(message.payload)


class DeadlineBackend:
    """An MQTT 5 backend answering ``<anything>.sleep-<ms>`` after that many milliseconds and
    recording the message expiry of each request, by payload."""

    def __init__(self, port: int) -> None:
        self.expiry: dict[str, int] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"svc-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.subscribed = threading.Event()

        def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            method = message.topic.rsplit("/", 1)[1]
            request: Any = message.properties
            self.expiry[message.payload.decode()] = int(
                getattr(request, "MessageExpiryInterval", -1)
            )
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = request.CorrelationData
            reply = (request.ResponseTopic, b"svc:" + message.payload)
            delay = int(method.rsplit("sleep-", 1)[1]) / 1000
            threading.Timer(
                delay, lambda: self.client.publish(*reply, qos=1, properties=props)
            ).start()

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_room_rpc_bus_deadline_for_js_callers(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, room_name: str, tmp_path: Path, kind: str
) -> None:
    """The backend of a room-to-bus RPC route gets the route's timeout whenever the caller waits
    that long. livekit-client announces max(T, 8 s), rtc-node max(T - 7 s, 1 s); both wait T.
    The bus deadline is min(route timeout, announced + 7 s), seen as the request's MQTT message
    expiry."""
    body = f"""\
connectors:
  - name: rpc-out
    from: {{room: "*", rpc: {{methods: ["bus.*"], reply_topic: "replies/{room_name}", timeout: 5}}}}
    to: {{mqtt: bus, topic: "svc/{room_name}/{{method}}"}}
  - name: rpc-long
    from: {{room: "*", rpc: {{methods: ["long.*"], reply_topic: "replies-long/{room_name}",
            timeout: 30}}}}
    to: {{mqtt: bus, topic: "svc/{room_name}/{{method}}"}}
"""
    backend = DeadlineBackend(mosquitto.port)
    backend.client.subscribe(f"svc/{room_name}/#", 1)
    assert await asyncio.to_thread(backend.subscribed.wait, 10), "no SUBACK"
    try:
        async with (
            run_bridge(bridge_yaml(livekit_server, mosquitto, None, room_name, body)),
            js_peer(kind, livekit_server, room_name, "caller", tmp_path) as js,
        ):
            deadline = time.monotonic() + 15
            while "bridge" not in await js.run("remotes"):
                assert time.monotonic() < deadline, "the JS peer never saw the bridge"
                await asyncio.sleep(0.05)

            replies: dict[str, dict[str, Any]] = {}

            async def call(method: str, payload: str, wait: float) -> str | int:
                reply: dict[str, Any] = await js.run(
                    "rpc",
                    destination="bridge",
                    method=method,
                    payload=payload,
                    timeout_ms=int(wait * 1000),
                )
                replies[payload] = reply
                return reply["ok"] if "ok" in reply else int(reply["code"])

            cases = [(t, ms) for t in (2.0, 8.0, 10.0) for ms in (0, 3500, 7000)]
            got = await asyncio.gather(
                *(call(f"bus.sleep-{ms}", f"{t}/{ms}", t) for t, ms in cases),
                call("long.sleep-0", "long/3", 3.0),
            )
            # Answered when the backend is faster than both the route (5 s) and the caller's
            # own wait T (both SDKs wait T, whatever they announce), with 1.5 s of margin either
            # way (a request stream's send may take a while before the caller's clock starts).
            want = [f"svc:{t}/{ms}" if ms / 1000 + 1.5 <= min(5.0, t) else 1502 for t, ms in cases]
            assert dict(zip(cases, got[:-1], strict=True)) == dict(zip(cases, want, strict=True)), (
                replies
            )
            assert got[-1] == "svc:long/3"
            # Every request on the 5 s route was given 5 s (the broker may have taken a second
            # off its expiry in transit).
            assert {p: e for p, e in backend.expiry.items() if not p.startswith("long")} == {
                f"{t}/{ms}": backend.expiry[f"{t}/{ms}"] for t, ms in cases
            }
            assert all(backend.expiry[f"{t}/{ms}"] in (4, 5) for t, ms in cases), backend.expiry
            # On the 30 s route a 3 s caller's backend gets what that caller announces + 7 s:
            # livekit-client 8 s + 7 s, rtc-node max(3 - 7, 1) + 7 s.
            long_expiry = {"browser": 15, "node": 8}[kind]
            assert backend.expiry["long/3"] in (long_expiry - 1, long_expiry), backend.expiry
    finally:
        backend.close()
