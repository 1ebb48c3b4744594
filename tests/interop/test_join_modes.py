"""Single and dual peer connection mode, each against the real livekit-server and SDK peers.

Our participant joins on `/rtc/v1` (one peer connection: our offer, both directions on our own
`_reliable` and `_lossy`) or on `/rtc` (a publisher connection we offer, a subscriber one the
server offers). Every leg here runs in both modes: join and leave, packets both ways (reliable
in order, lossy, destinations), text and byte streams, RPC (peer and server-initiated),
delivery acknowledgements, and recovery (a lost signalling socket, a server restart). The other
interop tests run in the default mode, "auto", which is single on this server.

"auto" falls back to dual on a 404 from `/rtc/v1` (a livekit-server older than 1.9.1): proven
with `OldServerFront`, an HTTP front on loopback that answers `/rtc/v1` as such a server does
and relays the rest to the real server (the WebRTC traffic goes to the server directly).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from livekit import rtc

from bridge.room.delivery import Delivery
from bridge.room.errors import NotConnectedError, RoomNotFoundError
from bridge.room.events import DataReceived, Reconnected
from bridge.room.room import Room, RoomOptions
from bridge.room.rpc import RpcInvocationData
from bridge.room.server_api import ServerApi
from bridge.room.signal import SinglePcUnsupportedError
from bridge.room.types import DataPacketKind
from tests.conftest import make_token
from tests.interop.conftest import eventually, our_peer, private_livekit_server, sdk_peer
from tests.interop.test_streams import Collector
from tests.services import LiveKitServer

MODES = [pytest.param(True, id="single"), pytest.param(False, id="dual")]


@pytest.fixture(params=MODES)
def single(request: pytest.FixtureRequest) -> bool:
    """The join mode of our participant: True for one peer connection, False for two."""
    value: bool = request.param
    return value


def _options(single: bool, **more: Any) -> RoomOptions:
    return RoomOptions(single_peer_connection=single, **more)


def _collect(sdk: rtc.Room) -> asyncio.Queue[rtc.DataPacket]:
    queue: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
    sdk.on("data_received", queue.put_nowait)
    return queue


def _assert_mode(ours: Room, single: bool) -> None:
    """The session runs in the mode asked for, with one or two peer connections."""
    assert ours.single_peer_connection is single
    session = ours._session
    assert session is not None and session.publisher is not None
    assert (session.subscriber is session.publisher) is single
    assert session.reliable is not None and session.lossy is not None
    # Our channels are on the connection we offered (in single mode: the only one).
    assert session.reliable.channel.transport is session.publisher.pc.sctp


def _cut_outgoing(ours: Room) -> None:
    """From now on nothing our participant sends on the connection of its channels leaves it."""
    session = ours._session
    assert session is not None and session.reliable is not None

    async def drop(_data: bytes) -> None:
        return None

    dtls: Any = session.reliable.channel.transport.transport
    dtls._send_data = drop


async def _meet(ours: Room, sdk: rtc.Room, sdk_identity: str = "sdk") -> None:
    await eventually(lambda: sdk_identity in ours.remote_participants, what="we see the SDK")
    await eventually(lambda: "ours" in sdk.remote_participants, what="the SDK sees us")


@asynccontextmanager
async def _ours_and_sdk(
    server: LiveKitServer, room: str, options: RoomOptions, *, sdk_first: bool = False
) -> AsyncIterator[tuple[Room, rtc.Room]]:
    """Our participant "ours" (with `options`) and an SDK peer "sdk" in `room`, yielded once
    each sees the other; `sdk_first`: the SDK peer joins before ours. Both leave on exit."""
    async with AsyncExitStack() as stack:

        async def join_sdk() -> rtc.Room:
            return await stack.enter_async_context(sdk_peer(server, room, "sdk"))

        early = await join_sdk() if sdk_first else None
        ours = await stack.enter_async_context(our_peer(server, room, "ours", options=options))
        sdk = early if early is not None else await join_sdk()
        await _meet(ours, sdk)
        yield ours, sdk


# --------------------------------------------------------------------------- join and leave


async def test_join_and_leave_in_each_mode(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    async with sdk_peer(livekit_server, room_name, "sdk-alice") as alice:
        ours = Room(_options(single))
        token = make_token(
            livekit_server, room_name, "ours", name="Bridge", attributes={"role": "bridge"}
        )
        await ours.connect(livekit_server.url, token)
        try:
            _assert_mode(ours, single)
            await eventually(lambda: "ours" in alice.remote_participants, what="SDK sees us")
            seen = alice.remote_participants["ours"]
            assert (seen.name, dict(seen.attributes)) == ("Bridge", {"role": "bridge"})
            assert set(ours.remote_participants) == {"sdk-alice"}
            assert ours.local_participant.sid.startswith("PA_")
            assert ours.counters["signal.single_pc_fallback"] == 0
        finally:
            await ours.disconnect()
        # We send `leave`: the server drops us at once (without it, after ICE timeouts).
        await eventually(
            lambda: "ours" not in alice.remote_participants, timeout=5, what="SDK sees us leave"
        )


async def test_auto_joins_this_server_with_a_single_peer_connection(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with our_peer(livekit_server, room_name, "ours") as ours:
        assert ours.options.single_peer_connection == "auto"
        _assert_mode(ours, True)


async def test_the_v1_join_request_carries_our_client_claims(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    """client_protocol and capabilities (URL parameters in v0, the JoinRequest in v1) reach
    the server and the peers, which choose the stream and RPC paths they use with us by them."""
    async with (
        our_peer(livekit_server, room_name, "ours", options=_options(single)) as ours,
        ServerApi(livekit_server.url, livekit_server.api_key, livekit_server.api_secret) as api,
    ):
        [info] = [p for p in await api.list_participants(room_name) if p.identity == "ours"]
        assert info.client_protocol == ours.options.client_protocol == 2
        assert list(info.capabilities) == list(ours.options.capabilities)
        assert info.permission.can_publish_data


# --------------------------------------------------------------------------- packets


async def test_reliable_packets_both_ways_in_order(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    async with _ours_and_sdk(livekit_server, room_name, _options(single)) as (ours, sdk):
        got = _collect(sdk)
        async with ours.events(DataReceived) as events:
            for i in range(200):
                await ours.local_participant.publish_data(f"m{i}".encode(), topic="down")
                if i < 100:
                    await sdk.local_participant.publish_data(f"s{i}".encode(), topic="up")
            to_sdk = [await asyncio.wait_for(got.get(), 10) for _ in range(200)]
            to_ours = [(await asyncio.wait_for(anext(events), 10)).packet for _ in range(100)]
        assert [p.data for p in to_sdk] == [f"m{i}".encode() for i in range(200)]
        assert {(p.topic, p.kind) for p in to_sdk} == {("down", rtc.DataPacketKind.KIND_RELIABLE)}
        assert {p.participant.identity if p.participant else None for p in to_sdk} == {"ours"}
        assert [p.data for p in to_ours] == [f"s{i}".encode() for i in range(100)]
        assert {(p.topic, p.kind) for p in to_ours} == {("up", DataPacketKind.KIND_RELIABLE)}
        assert {p.participant_identity for p in to_ours} == {"sdk"}
        assert ours.counters["packets.duplicate"] == 0


async def test_lossy_packets_both_ways(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    async with _ours_and_sdk(livekit_server, room_name, _options(single)) as (ours, sdk):
        got = _collect(sdk)
        async with ours.events(DataReceived) as events:
            for i in range(20):
                await ours.local_participant.publish_data(f"l{i}".encode(), reliable=False)
                await sdk.local_participant.publish_data(f"k{i}".encode(), reliable=False)
                await asyncio.sleep(0.01)
            to_sdk = await asyncio.wait_for(got.get(), 10)
            to_ours = (await asyncio.wait_for(anext(events), 10)).packet
        # Lossy means no retransmission, not loss by design: each side gets some.
        assert to_sdk.kind == rtc.DataPacketKind.KIND_LOSSY
        assert to_sdk.data in {f"l{i}".encode() for i in range(20)}
        assert to_ours.kind == DataPacketKind.KIND_LOSSY
        assert to_ours.data in {f"k{i}".encode() for i in range(20)}


async def test_destinations_both_ways(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    async with (
        our_peer(livekit_server, room_name, "ours", options=_options(single)) as ours,
        sdk_peer(livekit_server, room_name, "bob") as bob,
        sdk_peer(livekit_server, room_name, "carol") as carol,
    ):
        to_bob, to_carol = _collect(bob), _collect(carol)
        await _meet(ours, bob, "bob")
        await _meet(ours, carol, "carol")
        await ours.local_participant.publish_data(b"for bob", destination_identities=["bob"])
        # Reliable delivery is ordered per sender: once carol has the later broadcast, the
        # earlier packet addressed to bob alone can no longer reach her.
        await ours.local_participant.publish_data(b"for all")
        assert (await asyncio.wait_for(to_bob.get(), 10)).data == b"for bob"
        assert (await asyncio.wait_for(to_bob.get(), 10)).data == b"for all"
        assert (await asyncio.wait_for(to_carol.get(), 10)).data == b"for all"
        assert to_carol.empty()
        async with ours.events(DataReceived) as events:
            await bob.local_participant.publish_data(b"to carol", destination_identities=["carol"])
            await bob.local_participant.publish_data(b"to ours", destination_identities=["ours"])
            packet = (await asyncio.wait_for(anext(events), 10)).packet
        assert (packet.data, packet.destination_identities) == (b"to ours", ("ours",))
        assert (await asyncio.wait_for(to_carol.get(), 10)).data == b"to carol"


# --------------------------------------------------------------------------- streams, RPC


async def test_text_and_byte_streams_both_ways(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    text = "".join(random.Random(3).choices("aü€🎉ß中 ", k=30_000))  # several chunks
    blob = random.Random(5).randbytes(300_000)
    collectors = [Collector() for _ in range(4)]
    sdk_texts, sdk_bytes, our_texts, our_bytes = collectors
    try:
        async with _ours_and_sdk(livekit_server, room_name, _options(single)) as (ours, sdk):
            sdk.register_text_stream_handler("t", sdk_texts)
            sdk.register_byte_stream_handler("b", sdk_bytes)
            ours.register_text_stream_handler("t", our_texts)
            ours.register_byte_stream_handler("b", our_bytes)
            await ours.local_participant.send_text(text, topic="t")
            await ours.local_participant.send_bytes(blob, topic="b", name="blob.bin")
            await sdk.local_participant.send_text(text, topic="t")
            await sdk.local_participant.send_bytes(blob, topic="b", name="blob.bin")
            for collector, sender in (
                (sdk_texts, "ours"),
                (sdk_bytes, "ours"),
                (our_texts, "sdk"),
                (our_bytes, "sdk"),
            ):
                got = await (await collector.next()).finished()
                assert got.error is None and got.sender == sender
            assert sdk_texts.all[0].text == our_texts.all[0].text == text
            want = hashlib.sha256(blob).hexdigest()
            assert sdk_bytes.all[0].digest.hexdigest() == our_bytes.all[0].digest.hexdigest()
            assert our_bytes.all[0].digest.hexdigest() == want
    finally:
        for collector in collectors:
            await collector.aclose()


async def test_rpc_both_ways_and_from_the_server(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    async def our_reverse(data: RpcInvocationData) -> str:
        return data.payload[::-1]

    async with (
        _ours_and_sdk(livekit_server, room_name, _options(single)) as (ours, sdk),
        ServerApi(livekit_server.url, livekit_server.api_key, livekit_server.api_secret) as api,
    ):
        sdk.local_participant.register_rpc_method("reverse", lambda d: d.payload[::-1])
        ours.local_participant.register_rpc_method("reverse", our_reverse)
        big = "".join(random.Random(9).choices("xyzé", k=20_000))  # over one packet: a stream
        to_sdk, to_ours = await asyncio.gather(
            ours.local_participant.perform_rpc(
                destination_identity="sdk", method="reverse", payload=big
            ),
            sdk.local_participant.perform_rpc(
                destination_identity="ours", method="reverse", payload="héllo"
            ),
        )
        assert (to_sdk, to_ours) == (big[::-1], "olléh")
        # Server-initiated calls arrive on the channel downstream data takes in each mode.
        assert await api.perform_rpc(room_name, "ours", "reverse", "wörld") == "dlröw"


# --------------------------------------------------------------------------- delivery


async def test_awaited_deliveries_reach_the_sdk_peer_even_if_we_go_silent(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    """A resolved `Delivery` means the server's SCTP stack acknowledged the packet: once all
    resolved, nothing more leaves our participant, and the SDK peer still gets every one."""
    async with _ours_and_sdk(livekit_server, room_name, _options(single), sdk_first=True) as (
        ours,
        sdk,
    ):
        got: list[bytes] = []
        sdk.on("data_received", lambda packet: got.append(packet.data))
        # Traffic the other way shares the association in single mode: it must not confuse
        # the acknowledgement bookkeeping of ours.
        echo = asyncio.ensure_future(_chatter(sdk, 100))
        deliveries: list[Delivery] = []
        for i in range(300):
            deliveries.append(await ours.local_participant.publish_data_tracked(f"d{i}".encode()))
        async with asyncio.timeout(20):
            for delivery in deliveries:
                await delivery
            await echo
        _cut_outgoing(ours)  # as if the bridge were SIGKILLed right now
        await eventually(lambda: len(got) >= 300, what="300 packets at the sdk peer")
        assert got == [f"d{i}".encode() for i in range(300)]


async def _chatter(sdk: rtc.Room, n: int) -> None:
    for i in range(n):
        await sdk.local_participant.publish_data(f"c{i}".encode(), destination_identities=["ours"])


async def test_a_lost_session_fails_pending_deliveries_and_rejoins_in_the_same_mode(
    livekit_server: LiveKitServer, room_name: str, single: bool
) -> None:
    options = _options(single, reconnect_initial_delay=0.2, reconnect_max_delay=2.0)
    async with _ours_and_sdk(livekit_server, room_name, options, sdk_first=True) as (ours, sdk):
        got = _collect(sdk)
        first_sid = ours.local_participant.sid
        _cut_outgoing(ours)  # in flight, never acknowledged
        pending = [
            await ours.local_participant.publish_data_tracked(f"p{i}".encode()) for i in range(5)
        ]
        async with ours.events(Reconnected) as reconnected:
            session = ours._session
            assert session is not None
            await session.signal.close()  # the connection to the server is lost
            for delivery in pending:
                with pytest.raises(NotConnectedError) as caught:
                    await asyncio.wait_for(delivery, 10)
                assert caught.value.retriable
            await asyncio.wait_for(anext(reconnected), 30)
        _assert_mode(ours, single)
        assert ours.local_participant.sid != first_sid  # a full rejoin: a new session
        await eventually(
            lambda: ours.local_participant.sid in {p.sid for p in sdk.remote_participants.values()},
            what="the sdk sees our new session",
        )
        async with ours.events(DataReceived) as events:
            for i in range(5):
                await ours.local_participant.publish_data(f"p{i}".encode(), wait_delivered=True)
            await sdk.local_participant.publish_data(b"back", destination_identities=["ours"])
            assert (await asyncio.wait_for(anext(events), 10)).packet.data == b"back"
        resent = [(await asyncio.wait_for(got.get(), 10)).data for _ in range(5)]
        assert resent == [f"p{i}".encode() for i in range(5)]


async def test_server_restart_then_rejoin_in_the_same_mode(
    tmp_path: Path, room_name: str, in_test_namespace: None, single: bool
) -> None:
    options = _options(single, reconnect_initial_delay=0.2, reconnect_max_delay=2.0)
    async with (
        private_livekit_server(tmp_path) as server,
        our_peer(server, room_name, "ours", options=options) as ours,
    ):
        seen: list[object] = []
        ours.on(Reconnected, seen.append)
        await asyncio.to_thread(server.restart)
        await eventually(lambda: bool(seen), timeout=60, what="rejoin after the server restart")
        _assert_mode(ours, single)
        async with sdk_peer(server, room_name, "sdk") as sdk:
            got = _collect(sdk)
            await _meet(ours, sdk)
            async with ours.events(DataReceived) as events:
                await ours.local_participant.publish_data(b"after restart")
                await sdk.local_participant.publish_data(b"hello again")
                assert (await asyncio.wait_for(got.get(), 10)).data == b"after restart"
                assert (await asyncio.wait_for(anext(events), 10)).packet.data == b"hello again"


# --------------------------------------------------------------------------- media sections


async def test_a_media_subscription_in_single_mode_is_declined_and_data_keeps_flowing(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    """What the server does when a single-PC participant gets subscribed to media: it asks for
    receive m-lines (`media_sections_requirement`) instead of offering. We carry data only and
    decline; the session stays up. (Our default, auto_subscribe off, never gets there: this
    test turns it on to make the server ask.)"""
    options = _options(True, auto_subscribe=True)
    async with _ours_and_sdk(livekit_server, room_name, options) as (ours, sdk):
        source = rtc.AudioSource(48_000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("mic", source)
        publish = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await sdk.local_participant.publish_track(track, publish)
        frame = rtc.AudioFrame.create(48_000, 1, 480)  # 10 ms of silence

        async def speak() -> None:
            # The server creates the published track on its first RTP packet.
            while True:
                await source.capture_frame(frame)

        speaking = asyncio.ensure_future(speak())
        try:
            await eventually(
                lambda: ours.counters["signal.media_sections_ignored"] > 0,
                timeout=20,
                what="the server asking for receive sections",
            )
            assert ours.isconnected and ours.counters["signal.unexpected_offer"] == 0
            got = _collect(sdk)
            async with ours.events(DataReceived) as events:
                await ours.local_participant.publish_data(b"still here", wait_delivered=True)
                await sdk.local_participant.publish_data(
                    b"and here", destination_identities=["ours"]
                )
                assert (await asyncio.wait_for(got.get(), 10)).data == b"still here"
                assert (await asyncio.wait_for(anext(events), 10)).packet.data == b"and here"
        finally:
            speaking.cancel()
            await asyncio.gather(speaking, return_exceptions=True)


# --------------------------------------------------------------------------- fallback


class OldServerFront:
    """An HTTP front on loopback for livekit-server that plays a server without `/rtc/v1`.

    `/rtc/v1` and `/rtc/v1/validate` get a 404 with `v1_text` (Go's mux says "404 page not
    found" for a path it has no handler for); everything else, the `/rtc` WebSocket included,
    is relayed to the real server. `paths` records what was asked, in order.
    """

    def __init__(self, server: LiveKitServer, v1_text: str = "404 page not found\n") -> None:
        self.server = server
        self.v1_text = v1_text
        self.paths: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._relays: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> OldServerFront:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._client = aiohttp.ClientSession()
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"ws://{host}:{port}"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        assert self._runner is not None and self._client is not None
        await self._runner.cleanup()
        await self._client.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        if request.path.startswith("/rtc/v1"):
            return web.Response(status=404, text=self.v1_text)
        assert self._client is not None
        target = self.server.http_url + request.path_qs
        if request.headers.get("Upgrade", "").lower() != "websocket":
            async with self._client.get(target) as resp:
                return web.Response(status=resp.status, body=await resp.read())
        try:
            upstream = await self._client.ws_connect(target.replace("http", "ws", 1))
        except aiohttp.WSServerHandshakeError as exc:
            return web.Response(status=exc.status)
        downstream = web.WebSocketResponse()
        await downstream.prepare(request)
        relays = [
            asyncio.ensure_future(_relay(upstream, downstream)),
            asyncio.ensure_future(_relay(downstream, upstream)),
        ]
        self._relays.update(relays)
        try:
            await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in relays:
                task.cancel()
                self._relays.discard(task)
            await upstream.close()
            await downstream.close()
        return downstream


async def _relay(
    source: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
    sink: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)


@asynccontextmanager
async def _front(server: LiveKitServer, **kw: str) -> AsyncIterator[OldServerFront]:
    async with OldServerFront(server, **kw) as front:
        yield front


async def test_auto_falls_back_to_dual_on_a_404_and_remembers_it_for_rejoins(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    options = RoomOptions(reconnect_initial_delay=0.2, reconnect_max_delay=2.0)
    async with (
        _front(livekit_server) as front,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        ours = Room(options)
        await ours.connect(front.url, make_token(livekit_server, room_name, "ours"))
        try:
            _assert_mode(ours, False)
            assert front.paths == ["/rtc/v1", "/rtc/v1/validate", "/rtc"]
            assert ours.counters["signal.single_pc_fallback"] == 1
            got = _collect(sdk)
            await _meet(ours, sdk)
            async with ours.events(DataReceived) as events:
                await ours.local_participant.publish_data(b"via /rtc", wait_delivered=True)
                await sdk.local_participant.publish_data(b"back", destination_identities=["ours"])
                assert (await asyncio.wait_for(got.get(), 10)).data == b"via /rtc"
                assert (await asyncio.wait_for(anext(events), 10)).packet.data == b"back"
            # A rejoin goes to /rtc straight away.
            async with ours.events(Reconnected) as reconnected:
                session = ours._session
                assert session is not None
                await session.signal.close()
                await asyncio.wait_for(anext(reconnected), 30)
            _assert_mode(ours, False)
            assert front.paths[3:] == ["/rtc"]
            assert ours.counters["signal.single_pc_fallback"] == 1
        finally:
            await ours.disconnect()


async def test_single_mode_asked_for_on_a_server_without_v1_fails_clearly(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with _front(livekit_server) as front:
        ours = Room(RoomOptions(single_peer_connection=True))
        token = make_token(livekit_server, room_name, "ours")
        with pytest.raises(SinglePcUnsupportedError, match=r"/rtc/v1 answered HTTP 404") as info:
            await ours.connect(front.url, token)
        assert "no single peer connection mode" in str(info.value)
        assert not info.value.retriable
        assert "/rtc" not in front.paths  # no dual attempt when single was asked for
        await ours.disconnect()


async def test_a_missing_room_on_v1_is_not_taken_for_an_old_server(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    """livekit-server's 404 for a room it will not create says so; that is no fallback."""
    async with _front(livekit_server, v1_text="requested room does not exist") as front:
        ours = Room()
        with pytest.raises(RoomNotFoundError, match="requested room does not exist"):
            await ours.connect(front.url, make_token(livekit_server, room_name, "ours"))
        assert front.paths == ["/rtc/v1", "/rtc/v1/validate"]
        await ours.disconnect()
