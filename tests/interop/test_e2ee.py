"""End-to-end encrypted data between our participant and official-SDK peers with E2EE on.

The SDK peers join with `RoomOptions(encryption=E2EEOptions(KeyProviderOptions(shared_key)))`,
the Python SDK's defaults otherwise (PBKDF2, salt ``LKFrameEncryptionKey``, AES-GCM). Our
participant gets the same key (`RoomOptions.e2ee`). A second participant of ours with no key
or a wrong one watches the wire: what the SDK sends really is encrypted (`encrypted_packet`),
and it is rejected there (counted, logged once), never delivered.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from livekit import rtc
from livekit.protocol import models

from bridge.room.data_tracks import DataTrackFrame, DataTrackFrameReceived
from bridge.room.e2ee import DataCryptor
from bridge.room.events import DataReceived
from bridge.room.room import Room, RoomOptions
from bridge.room.rpc import RpcInvocationData
from bridge.room.server_api import ServerApi
from bridge.room.types import DataPacketKind
from tests.conftest import make_token
from tests.interop.conftest import eventually, our_peer, sdk_frames
from tests.interop.test_data_tracks import _push_until
from tests.interop.test_streams import Collector, see_each_other
from tests.services import LiveKitServer

KEY = b"roombus-e2ee-interop-shared-key"
CRYPTOR = DataCryptor(KEY)


@asynccontextmanager
async def e2ee_sdk_peer(
    server: LiveKitServer, room: str, identity: str, key: bytes = KEY, **kdf: Any
) -> AsyncIterator[rtc.Room]:
    """An official-SDK participant with E2EE (shared `key`) on, disconnected on exit."""
    options = rtc.RoomOptions(
        encryption=rtc.E2EEOptions(
            key_provider_options=rtc.KeyProviderOptions(shared_key=key, **kdf)
        )
    )
    peer = rtc.Room()
    await peer.connect(server.url, make_token(server, room, identity), options)
    try:
        yield peer
    finally:
        await peer.disconnect()


class Wire:
    """What a `Room` receives on its data channels, before decryption."""

    def __init__(self, room: Room, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kinds: list[str | None] = []
        original = room._on_message

        def on_message(label: str, kind: DataPacketKind, message: bytes | str) -> None:
            if isinstance(message, bytes):
                packet = models.DataPacket()
                packet.ParseFromString(message)
                self.kinds.append(packet.WhichOneof("value"))
            original(label, kind, message)

        monkeypatch.setattr(room, "_on_message", on_message)


@pytest.fixture
async def collectors() -> AsyncIterator[Callable[[], Collector]]:
    made: list[Collector] = []

    def make() -> Collector:
        made.append(Collector())
        return made[-1]

    yield make
    for collector in made:
        await collector.aclose()


def _collect(sdk: rtc.Room) -> asyncio.Queue[rtc.DataPacket]:
    queue: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
    sdk.on("data_received", queue.put_nowait)
    return queue


async def test_packets_both_ways_encrypted_on_the_wire(
    livekit_server: LiveKitServer, room_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        our_peer(livekit_server, room_name, "ours", RoomOptions(e2ee=CRYPTOR)) as ours,
        our_peer(livekit_server, room_name, "keyless") as keyless,
        e2ee_sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        wire, keyless_wire = Wire(ours, monkeypatch), Wire(keyless, monkeypatch)
        got = _collect(sdk)
        await see_each_other(ours, sdk)
        async with ours.events(DataReceived) as events:
            for i in range(20):
                await sdk.local_participant.publish_data(f"s{i}".encode(), topic="up")
            received = [(await asyncio.wait_for(anext(events), 10)).packet for _ in range(20)]
        assert [p.data for p in received] == [f"s{i}".encode() for i in range(20)]
        assert {(p.topic, p.kind, p.participant_identity) for p in received} == {
            ("up", DataPacketKind.KIND_RELIABLE, "sdk")
        }
        assert all(p.encrypted for p in received)
        # The Python SDK 1.2.1 does encrypt data packets when E2EE is on.
        assert wire.kinds == ["encrypted_packet"] * 20

        for i in range(20):
            await ours.local_participant.publish_data(
                f"o{i}".encode(), topic="down", destination_identities=["sdk", "keyless"]
            )
        to_sdk = [await asyncio.wait_for(got.get(), 10) for _ in range(20)]
        assert [p.data for p in to_sdk] == [f"o{i}".encode() for i in range(20)]
        assert {p.topic for p in to_sdk} == {"down"}
        assert {p.participant.identity if p.participant else None for p in to_sdk} == {"ours"}
        # Ours are encrypted too: the keyless participant saw only ciphertext, and dropped it.
        await eventually(lambda: keyless.counters["rejected.encrypted"] == 40, what="rejections")
        assert set(keyless_wire.kinds) == {"encrypted_packet"}
        assert keyless.counters["packets.received"] == 0
    assert ours.counters["rejected.encrypted"] == 0


async def test_text_streams_both_ways_and_bytes_sdk_to_ours(
    livekit_server: LiveKitServer,
    room_name: str,
    collectors: Callable[[], Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts_ours, bytes_ours, texts_sdk = collectors(), collectors(), collectors()

    def setup(room: Room) -> None:
        room.register_text_stream_handler("chat", texts_ours)
        room.register_byte_stream_handler("files", bytes_ours)

    blob = os.urandom(100_000)
    long_text = "ünïcödé, 世界 🎉 " * 3000  # chunked (and deflated by the SDK)
    async with (
        our_peer(livekit_server, room_name, "ours", RoomOptions(e2ee=CRYPTOR), setup) as ours,
        e2ee_sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        wire = Wire(ours, monkeypatch)
        sdk.register_text_stream_handler("chat", texts_sdk)
        await see_each_other(ours, sdk)
        for text in ("hello, encrypted", long_text):
            await sdk.local_participant.send_text(text, topic="chat", attributes={"a": "1"})
            got = await (await texts_ours.next()).finished()
            assert got.error is None and got.text == text and got.sender == "sdk"
            assert got.info.attributes == {"a": "1"}
        writer = await sdk.local_participant.stream_text(topic="chat")
        for piece in ("pie", "ces ", "of ", "llm"):
            await writer.write(piece)
        await writer.aclose()
        got = await (await texts_ours.next()).finished()
        assert got.error is None and got.text == "pieces of llm"

        await sdk.local_participant.send_bytes(blob, name="b.bin", topic="files")
        got = await (await bytes_ours.next()).finished()
        assert got.error is None and got.data == blob and got.info.name == "b.bin"
        assert set(wire.kinds) == {"encrypted_packet"}

        for text in ("hello back", long_text):
            await ours.local_participant.send_text(text, topic="chat")
            got = await (await texts_sdk.next()).finished()
            assert got.error is None and got.text == text and got.sender == "ours"
        ours_writer = await ours.local_participant.stream_text(topic="chat")
        for piece in ("a", "b", "c"):
            await ours_writer.write(piece)
        await ours_writer.aclose()
        got = await (await texts_sdk.next()).finished()
        assert got.error is None and got.text == "abc"
    assert ours.counters["rejected.encrypted"] == 0
    assert ours.counters["streams.encrypted_unsupported"] == 0


@pytest.mark.parametrize("key", [None, b"not-the-room-key"], ids=["no_key", "wrong_key"])
async def test_without_the_key_nothing_is_delivered_and_it_is_logged_once(
    livekit_server: LiveKitServer,
    room_name: str,
    collectors: Callable[[], Collector],
    caplog: pytest.LogCaptureFixture,
    key: bytes | None,
) -> None:
    texts = collectors()
    options = RoomOptions(e2ee=DataCryptor(key) if key else None)
    async with (
        our_peer(
            livekit_server, room_name, "ours", options,
            setup=lambda room: room.register_text_stream_handler("chat", texts),
        ) as ours,
        e2ee_sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):  # fmt: skip
        await see_each_other(ours, sdk)
        with caplog.at_level(logging.WARNING, logger="roombus.room"):
            async with ours.events(DataReceived) as events:
                for i in range(5):
                    await sdk.local_participant.publish_data(f"s{i}".encode(), topic="up")
                await sdk.local_participant.send_text("secret text", topic="chat")
                await eventually(
                    lambda: ours.counters["rejected.encrypted"] == 6, what="six rejections"
                )
                await asyncio.sleep(0.3)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(anext(events), 0.2)
        assert texts.arrived.empty()
        assert ours.counters["packets.received"] == 0
        lines = [r.getMessage() for r in caplog.records if "encrypted" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "rejected.encrypted" in lines[0]
        assert ("no E2EE key" if key is None else "does not decrypt") in lines[0]


async def test_hkdf_and_a_custom_salt(livekit_server: LiveKitServer, room_name: str) -> None:
    salt = b"our-own-salt"
    cryptor = DataCryptor(KEY, ratchet_salt=salt, key_derivation="hkdf")
    kdf: dict[str, Any] = {
        "ratchet_salt": salt,
        "key_derivation_function": rtc.KeyDerivationFunction.HKDF,
    }
    async with (
        our_peer(livekit_server, room_name, "ours", RoomOptions(e2ee=cryptor)) as ours,
        e2ee_sdk_peer(livekit_server, room_name, "sdk", **kdf) as sdk,
    ):
        got = _collect(sdk)
        await see_each_other(ours, sdk)
        async with ours.events(DataReceived) as events:
            await sdk.local_participant.publish_data(b"up", topic="t")
            packet = (await asyncio.wait_for(anext(events), 10)).packet
        assert packet.data == b"up" and packet.encrypted
        await ours.local_participant.publish_data(b"down", topic="t")
        assert (await asyncio.wait_for(got.get(), 10)).data == b"down"


@pytest.mark.parametrize("client_protocol", [2, 0], ids=["rpc_v2", "rpc_v1_from_the_sdk"])
async def test_rpc_both_ways(
    livekit_server: LiveKitServer,
    room_name: str,
    monkeypatch: pytest.MonkeyPatch,
    client_protocol: int,
) -> None:
    options = RoomOptions(e2ee=CRYPTOR, client_protocol=client_protocol, capabilities=[])

    async def reverse(data: RpcInvocationData) -> str:
        return data.payload[::-1]

    async with (
        our_peer(livekit_server, room_name, "ours", options) as ours,
        e2ee_sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        wire = Wire(ours, monkeypatch)
        sdk.local_participant.register_rpc_method("reverse", lambda d: d.payload[::-1])
        ours.local_participant.register_rpc_method("reverse", reverse)
        await see_each_other(ours, sdk)
        to_sdk, to_ours = await asyncio.gather(
            ours.local_participant.perform_rpc(
                destination_identity="sdk", method="reverse", payload="héllo 世界"
            ),
            sdk.local_participant.perform_rpc(
                destination_identity="ours", method="reverse", payload="héllo 世界"
            ),
        )
        assert to_sdk == to_ours == "界世 olléh"
        assert set(wire.kinds) == {"encrypted_packet"}
    assert ours.counters["rejected.encrypted"] == 0


# ------------------------------------------------------------------------------- data tracks


def _track_frames(ours: Room) -> list[DataTrackFrameReceived]:
    got: list[DataTrackFrameReceived] = []
    ours.on(DataTrackFrameReceived, got.append)
    return got


async def test_data_track_frames_both_ways(livekit_server: LiveKitServer, room_name: str) -> None:
    big = bytes(range(256)) * 150  # 38,400 bytes: several packets, one ciphertext
    async with (
        our_peer(livekit_server, room_name, "ours", RoomOptions(e2ee=CRYPTOR)) as ours,
        our_peer(livekit_server, room_name, "keyless") as keyless,
        e2ee_sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        got, keyless_got = _track_frames(ours), _track_frames(keyless)
        track = await sdk.local_participant.publish_data_track(name="telemetry")
        await eventually(
            lambda: ours.remote_data_tracks.get("sdk") == ["telemetry"], what="the sdk's track"
        )
        ours.subscribe_data_track("sdk", "telemetry")
        keyless.subscribe_data_track("sdk", "telemetry")
        for frame in (
            rtc.DataTrackFrame(payload=b"first", user_timestamp=0x0102030405060708),
            rtc.DataTrackFrame(payload=big),
        ):
            await _push_until(
                lambda f=frame: track.try_push(f),  # type: ignore[misc]
                lambda p=frame.payload: any(e.frame.payload == p for e in got),  # type: ignore[misc]
                what=f"a {len(frame.payload)}-byte frame from the sdk",
            )
        first = next(e for e in got if e.frame.payload == b"first")
        assert first.frame.user_timestamp == 0x0102030405060708
        assert ours.counters["data_tracks.e2ee_dropped"] == 0
        # The SDK's frames really are encrypted: without the key nothing is delivered.
        await eventually(
            lambda: keyless.counters["data_tracks.e2ee_dropped"] > 0, what="keyless drops"
        )
        assert keyless_got == []

        published: asyncio.Queue[rtc.RemoteDataTrack] = asyncio.Queue()
        sdk.on("data_track_published", published.put_nowait)
        ours_track = await ours.local_participant.publish_data_track("ours-telemetry")
        remote = await asyncio.wait_for(published.get(), 15)
        assert remote.info.uses_e2ee
        async with sdk_frames(remote) as received:
            for ours_frame in (DataTrackFrame(b"stamped", user_timestamp=17), DataTrackFrame(big)):
                await _push_until(
                    lambda f=ours_frame: ours_track.try_push(f),  # type: ignore[misc]
                    lambda p=ours_frame.payload: any(r.payload == p for r in received),  # type: ignore[misc]
                    what=f"a {len(ours_frame.payload)}-byte frame at the sdk",
                )
        assert next(r for r in received if r.payload == b"stamped").user_timestamp == 17


async def test_server_initiated_rpc_is_answered_in_the_clear(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    """The server cannot read encrypted replies: to it (a caller that is no participant), in clear.

    The request itself comes from the server, unencrypted; only the answer could be hidden,
    and hiding it from the one who asked would only make the call time out.
    """

    async def greet(data: RpcInvocationData) -> str:
        return f"hi {data.payload}"

    async with (
        our_peer(livekit_server, room_name, "ours", RoomOptions(e2ee=CRYPTOR)) as ours,
        ServerApi(livekit_server.url, livekit_server.api_key, livekit_server.api_secret) as server,
    ):
        ours.local_participant.register_rpc_method("greet", greet)
        assert await server.perform_rpc(room_name, "ours", "greet", "wörld") == "hi wörld"
