"""ServerApi and mint_token against the real livekit-server, with official-SDK participants.

The pure helpers (`http_url`, token claims, RPC error parsing) are checked first, without the
server; everything else talks to the pinned livekit-server of the `livekit_server` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from livekit import api, rtc
from livekit.rtc.room import EventTypes

from bridge.room.errors import (
    AuthError,
    DataPacketTooLargeError,
    InvalidUrlError,
    RoomError,
    RoomNotFoundError,
    RpcError,
    ServerUnreachableError,
    StateUpdateError,
)
from bridge.room.server_api import ServerApi, _rpc_error, http_url, mint_token
from tests.conftest import make_token
from tests.services import LiveKitServer

# The server's limits as measured by the tests below (server defaults of v1.13.5).
MAX_METADATA_BYTES = 512 * 1024
MAX_ATTRIBUTES_BYTES = 64 * 1024
MAX_NAME_BYTES = 256


SECRET = "a-secret-of-at-least-32-characters"  # PyJWT warns about shorter HMAC keys
BUILTIN_1400 = "Method not supported at destination"

# ------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://h:7880", "http://h:7880"),
        ("wss://lk.example.com", "https://lk.example.com"),
        ("http://192.0.2.1:7880/", "http://192.0.2.1:7880"),
        ("https://h/prefix/", "https://h/prefix"),
        ("WSS://H:443", "https://H:443"),
    ],
)
def test_http_url_maps_ws_schemes(url: str, expected: str) -> None:
    assert http_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["ftp://h", "h:7880", "ws://", "ws://h:99999", "ws://h:x", "wss://h/?a=1", "", "ws://h#f"],
)
def test_http_url_rejects_non_livekit_urls(url: str) -> None:
    with pytest.raises(InvalidUrlError, match="invalid LiveKit URL"):
        http_url(url)


def test_mint_token_claims() -> None:
    token = mint_token(
        "key",
        "secret-secret-secret-secret-secret",
        identity="bridge-1",
        room="lobby",
        name="Bridge",
        ttl=timedelta(minutes=5),
        metadata='{"v":1}',
        attributes={"role": "bridge"},
        hidden=True,
        kind="bridge",
    )
    claims = api.TokenVerifier("key", "secret-secret-secret-secret-secret").verify(token)
    assert claims.identity == "bridge-1"
    assert (claims.name, claims.metadata, claims.kind) == ("Bridge", '{"v":1}', "bridge")
    assert claims.attributes == {"role": "bridge"}
    video = claims.video
    assert video is not None
    assert (video.room_join, video.room, video.hidden) == (True, "lobby", True)
    assert (video.can_publish_data, video.can_subscribe, video.can_update_own_metadata) == (
        True,
        True,
        True,
    )
    with pytest.raises(Exception, match="Signature"):
        api.TokenVerifier("key", "another-secret-another-secret-xx").verify(token)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"identity": "", "room": "r"},
        {"identity": "i", "room": ""},
        {"identity": "i", "room": "r", "ttl": timedelta(0)},
        {"identity": "i", "room": "r", "kind": "robot"},
    ],
)
def test_mint_token_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="mint_token"):
        mint_token("key", "secret", **kwargs)


@pytest.mark.parametrize(
    ("code", "text", "message", "data"),
    [
        (4001, "bad thing: some data", "bad thing", "some data"),
        (4001, "bad thing", "bad thing", None),
        (4001, 'bad: {"a": 1}', "bad", '{"a": 1}'),
        (1500, "Application error in method handler", "Application error in method handler", None),
        (
            1400,
            "Method not supported at destination: x: y",
            "Method not supported at destination",
            "x: y",
        ),
    ],
)
def test_rpc_error_text_parsing(code: int, text: str, message: str, data: str | None) -> None:
    error = _rpc_error(code, text)
    assert (error.code, error.message, error.data) == (code, message, data)


def test_invalid_url_and_arguments_fail_at_construction() -> None:
    with pytest.raises(InvalidUrlError):
        ServerApi("tcp://h:1", "k", "s")
    with pytest.raises(ValueError, match="api_key"):
        ServerApi("ws://h:1", "", "s")
    with pytest.raises(ValueError, match="timeout"):
        ServerApi("ws://h:1", "k", "s", timeout=0)


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture
async def server_api(livekit_server: LiveKitServer) -> AsyncIterator[ServerApi]:
    async with ServerApi(
        livekit_server.url, livekit_server.api_key, livekit_server.api_secret
    ) as s:
        yield s


def token(server: LiveKitServer, room: str, identity: str, **kwargs: Any) -> str:
    return mint_token(server.api_key, server.api_secret, identity=identity, room=room, **kwargs)


@asynccontextmanager
async def sdk_participants(
    server: LiveKitServer, room: str, *identities: str
) -> AsyncIterator[dict[str, rtc.Room]]:
    """Official-SDK participants in `room`, each seeing all the others before this yields."""
    rooms: dict[str, rtc.Room] = {}
    try:
        for identity in identities:
            sdk = rtc.Room()
            rooms[identity] = sdk
            await sdk.connect(server.url, token(server, room, identity))
        async with asyncio.timeout(20):
            for identity, sdk in rooms.items():
                while set(sdk.remote_participants) != set(rooms) - {identity}:
                    await asyncio.sleep(0.05)
        yield rooms
    finally:
        for sdk in rooms.values():
            await sdk.disconnect()


@dataclass
class Recorder:
    """Collects the arguments of one SDK event."""

    calls: list[tuple[Any, ...]]

    async def wait(self, predicate: Callable[[tuple[Any, ...]], bool], seconds: float = 10) -> None:
        try:
            async with asyncio.timeout(seconds):
                while not any(predicate(c) for c in self.calls):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"event not seen in {seconds} s; got {self.calls}") from None


def record(sdk: rtc.Room, event: EventTypes) -> Recorder:
    rec = Recorder([])
    sdk.on(event, lambda *args: rec.calls.append(args))
    return rec


# ------------------------------------------------------------------------------------- rooms


async def test_create_list_delete_room(server_api: ServerApi, room_name: str) -> None:
    created = await server_api.create_room(room_name, metadata="m0", empty_timeout=30)
    assert (created.name, created.metadata, created.empty_timeout) == (room_name, "m0", 30)
    assert created.sid.startswith("RM_")
    # Creating an existing room returns it unchanged.
    again = await server_api.create_room(room_name, metadata="other")
    assert (again.sid, again.metadata) == (created.sid, "m0")

    listed = await server_api.list_rooms([room_name, room_name + "-absent"])
    assert [r.name for r in listed] == [room_name]
    assert room_name in [r.name for r in await server_api.list_rooms()]

    await server_api.delete_room(room_name)
    assert await server_api.list_rooms([room_name]) == []
    with pytest.raises(RoomNotFoundError, match=rf"server_api: DeleteRoom room={room_name} failed"):
        await server_api.delete_room(room_name)


async def test_missing_room_errors(server_api: ServerApi, room_name: str) -> None:
    with pytest.raises(RoomNotFoundError, match=r"UpdateRoomMetadata .*room not found"):
        await server_api.update_room_metadata(room_name, "x")
    # The pinned server lists no participants for a missing room rather than failing.
    assert await server_api.list_participants(room_name) == []
    # SendData to a room no node hosts: the server waits ~3 s for a node, then 503.
    with pytest.raises(RoomNotFoundError, match=r"SendData .*not active"):
        await server_api.send_data(room_name, b"x")


async def test_room_metadata_update_reaches_sdk_participant(
    livekit_server: LiveKitServer, server_api: ServerApi, room_name: str
) -> None:
    async with sdk_participants(livekit_server, room_name, "alice") as sdks:
        changes = record(sdks["alice"], "room_metadata_changed")
        room = await server_api.update_room_metadata(room_name, '{"topic":"ops"}')
        assert room.metadata == '{"topic":"ops"}'
        await changes.wait(lambda c: c == ("", '{"topic":"ops"}'))
        assert sdks["alice"].metadata == '{"topic":"ops"}'


async def test_update_participant_seen_by_itself_and_others(
    livekit_server: LiveKitServer, server_api: ServerApi, room_name: str
) -> None:
    async with sdk_participants(livekit_server, room_name, "alice", "bob") as sdks:
        alice_attrs = record(sdks["alice"], "participant_attributes_changed")
        bob_attrs = record(sdks["bob"], "participant_attributes_changed")
        bob_meta = record(sdks["bob"], "participant_metadata_changed")
        bob_name = record(sdks["bob"], "participant_name_changed")

        info = await server_api.update_participant(
            room_name, "alice", attributes={"role": "ops", "x": "1"}, metadata="m1", name="Alice"
        )
        assert (info.identity, info.metadata, info.name) == ("alice", "m1", "Alice")
        assert dict(info.attributes) == {"role": "ops", "x": "1"}

        await alice_attrs.wait(
            lambda c: c[0] == {"role": "ops", "x": "1"} and c[1].identity == "alice"
        )
        await bob_attrs.wait(
            lambda c: c[0] == {"role": "ops", "x": "1"} and c[1].identity == "alice"
        )
        # (The SDK passes the new value as "old" too: only the new value is checked.)
        await bob_meta.wait(lambda c: c[0].identity == "alice" and c[2] == "m1")
        await bob_name.wait(lambda c: c[0].identity == "alice" and c[2] == "Alice")

        # Merged key by key; "" deletes; empty metadata and name leave them unchanged.
        info = await server_api.update_participant(room_name, "alice", attributes={"x": ""})
        assert dict(info.attributes) == {"role": "ops"}
        assert (info.metadata, info.name) == ("m1", "Alice")
        await bob_attrs.wait(lambda c: c[0] == {"x": ""} and c[1].identity == "alice")
        assert sdks["bob"].remote_participants["alice"].attributes == {"role": "ops"}

        with pytest.raises(
            RoomError, match=r"UpdateParticipant .*participant 'carol' not found"
        ) as err:
            await server_api.update_participant(room_name, "carol", metadata="x")
        assert not isinstance(err.value, RoomNotFoundError)


async def test_server_state_size_limits(
    livekit_server: LiveKitServer, server_api: ServerApi, room_name: str
) -> None:
    async with sdk_participants(livekit_server, room_name, "alice"):
        # Exactly at each limit is accepted, one byte more is refused.
        await server_api.update_participant(room_name, "alice", metadata="m" * MAX_METADATA_BYTES)
        with pytest.raises(StateUpdateError, match="metadata size exceeds limits 524288") as err:
            await server_api.update_participant(
                room_name, "alice", metadata="m" * (MAX_METADATA_BYTES + 1)
            )
        assert err.value.reason == "LIMIT_EXCEEDED"
        # The attribute limit counts keys and values.
        await server_api.update_participant(
            room_name, "alice", attributes={"k": "v" * (MAX_ATTRIBUTES_BYTES - 1)}
        )
        with pytest.raises(StateUpdateError, match="attribute size exceeds limits 65536"):
            await server_api.update_participant(
                room_name, "alice", attributes={"k": "v" * MAX_ATTRIBUTES_BYTES}
            )
        await server_api.update_participant(room_name, "alice", name="n" * MAX_NAME_BYTES)
        with pytest.raises(StateUpdateError, match="name length exceeds limits 256"):
            await server_api.update_participant(room_name, "alice", name="n" * (MAX_NAME_BYTES + 1))
        await server_api.update_room_metadata(room_name, "r" * MAX_METADATA_BYTES)
        with pytest.raises(StateUpdateError, match=r"UpdateRoomMetadata .*exceeds limits 524288"):
            await server_api.update_room_metadata(room_name, "r" * (MAX_METADATA_BYTES + 1))


# ------------------------------------------------------------------------------------- data


async def test_send_data_to_one_identity(
    livekit_server: LiveKitServer, server_api: ServerApi, room_name: str
) -> None:
    async with sdk_participants(livekit_server, room_name, "bob", "carol") as sdks:
        bob_got, carol_got = (
            record(sdks["bob"], "data_received"),
            record(sdks["carol"], "data_received"),
        )
        await server_api.send_data(
            room_name, b"for bob", topic="orders", destination_identities=["bob"]
        )
        await bob_got.wait(lambda c: c[0].data == b"for bob")
        packet: rtc.DataPacket = bob_got.calls[0][0]
        assert packet.topic == "orders"
        assert packet.kind == rtc.DataPacketKind.KIND_RELIABLE
        assert packet.participant is None  # sent by the server: no sender
        await asyncio.sleep(1.0)  # grace period: carol must get nothing
        assert carol_got.calls == []

        # Without destinations everyone gets it, lossy too.
        await server_api.send_data(room_name, b"all", reliable=False)
        await bob_got.wait(lambda c: c[0].data == b"all")
        await carol_got.wait(lambda c: c[0].data == b"all")
        assert carol_got.calls[0][0].kind == rtc.DataPacketKind.KIND_LOSSY


async def test_send_data_size_limit(
    livekit_server: LiveKitServer, server_api: ServerApi, room_name: str
) -> None:
    with pytest.raises(DataPacketTooLargeError, match="over the 64000-byte limit"):
        await server_api.send_data(room_name, b"x" * 64_000, topic="t")
    # Just under the limit is accepted by the server and delivered whole.
    async with sdk_participants(livekit_server, room_name, "bob") as sdks:
        got = record(sdks["bob"], "data_received")
        big = bytes(range(256)) * 249  # 63,744 bytes
        await server_api.send_data(room_name, big, topic="t")
        await got.wait(lambda c: c[0].data == big)


# ------------------------------------------------------------------------------------- RPC


async def _server_can_reach(
    server_api: ServerApi, room_name: str, sdk: rtc.Room, identity: str
) -> None:
    """Return once a packet the server sends to `identity` arrives (its data channel is open)."""
    got = record(sdk, "data_received")
    async with asyncio.timeout(30):
        while not any(c[0].topic == "probe" for c in got.calls):
            with contextlib.suppress(RoomError):
                await server_api.send_data(
                    room_name, b"probe", topic="probe", destination_identities=[identity]
                )
            await asyncio.sleep(0.5)


async def test_perform_rpc(
    livekit_server: LiveKitServer, server_api: ServerApi, room_name: str
) -> None:
    async with sdk_participants(livekit_server, room_name, "alice") as sdks:
        local = sdks["alice"].local_participant
        callers: list[str] = []

        async def echo(data: rtc.RpcInvocationData) -> str:
            callers.append(data.caller_identity)
            return "pong:" + data.payload

        async def refuse(data: rtc.RpcInvocationData) -> str:
            raise rtc.RpcError(4001, "bad thing", '{"why": "because"}')

        async def crash(data: rtc.RpcInvocationData) -> str:
            raise ValueError("boom")

        async def slow(data: rtc.RpcInvocationData) -> str:
            await asyncio.sleep(3)
            return "late"

        local.register_rpc_method("echo", echo)
        local.register_rpc_method("refuse", refuse)
        local.register_rpc_method("crash", crash)
        local.register_rpc_method("slow", slow)
        # The SDK's connect returns before the server's data channel to it is open, and then
        # PerformRpc fails with "data channel is not available" (seen under full-suite load):
        # wait until a server packet reaches alice.
        await _server_can_reach(server_api, room_name, sdks["alice"], "alice")

        assert await server_api.perform_rpc(room_name, "alice", "echo", "ping") == "pong:ping"
        assert await server_api.perform_rpc(room_name, "alice", "echo", "") == "pong:"
        assert len(callers) == 2 and callers[0]  # a random id stands in for the server

        with pytest.raises(RpcError) as err:
            await server_api.perform_rpc(room_name, "alice", "refuse", "x")
        assert (err.value.code, err.value.message, err.value.data) == (
            4001,
            "bad thing",
            '{"why": "because"}',
        )

        with pytest.raises(RpcError) as err:
            await server_api.perform_rpc(room_name, "alice", "crash", "x")
        assert (err.value.code, err.value.message) == (1500, "Application error in method handler")

        with pytest.raises(RpcError) as err:
            await server_api.perform_rpc(room_name, "alice", "no-such-method", "x")
        assert (err.value.code, err.value.message) == (1400, "Method not supported at destination")

        started = time.monotonic()
        with pytest.raises(RpcError) as err:
            await server_api.perform_rpc(room_name, "alice", "slow", "x", response_timeout=1.0)
        assert err.value.code == RpcError.RESPONSE_TIMEOUT
        assert time.monotonic() - started < 8  # the 1 s timeout, not the 10 s default

        with pytest.raises(RpcError) as err:
            await server_api.perform_rpc(room_name, "alice", "echo", "x" * 15_361)
        assert err.value.code == RpcError.REQUEST_PAYLOAD_TOO_LARGE
        assert await server_api.perform_rpc(room_name, "alice", "echo", "x" * 15_355) == (
            "pong:" + "x" * 15_355
        )

        with pytest.raises(RpcError) as err:
            await server_api.perform_rpc(room_name, "nobody", "echo", "x")
        assert err.value.code == RpcError.RECIPIENT_NOT_FOUND


# ---------------------------------------------------------------------------------- tokens


async def test_minted_token_joins_with_claims(
    livekit_server: LiveKitServer, server_api: ServerApi, room_name: str
) -> None:
    async with sdk_participants(livekit_server, room_name, "observer") as sdks:
        joined = record(sdks["observer"], "participant_connected")
        minted = rtc.Room()
        await minted.connect(
            livekit_server.url,
            token(
                livekit_server,
                room_name,
                "bridge-1",
                name="Bridge One",
                metadata='{"site":"a"}',
                attributes={"role": "bridge", "zone": "eu"},
            ),
        )
        try:
            me = minted.local_participant
            assert (me.identity, me.name, me.metadata) == ("bridge-1", "Bridge One", '{"site":"a"}')
            assert me.attributes == {"role": "bridge", "zone": "eu"}
            await joined.wait(lambda c: c[0].identity == "bridge-1")
            seen = sdks["observer"].remote_participants["bridge-1"]
            assert (seen.name, seen.metadata) == ("Bridge One", '{"site":"a"}')
            assert seen.attributes == {"role": "bridge", "zone": "eu"}
            # The grant to update our own metadata is in the token.
            await me.set_attributes({"zone": "us"})
            infos = {p.identity: p for p in await server_api.list_participants(room_name)}
            assert dict(infos["bridge-1"].attributes) == {"role": "bridge", "zone": "us"}
            assert infos["bridge-1"].permission.can_update_metadata
        finally:
            await minted.disconnect()


async def test_hidden_token_is_invisible_to_others(
    livekit_server: LiveKitServer, server_api: ServerApi, room_name: str
) -> None:
    async with sdk_participants(livekit_server, room_name, "observer") as sdks:
        ghost = rtc.Room()
        await ghost.connect(
            livekit_server.url, token(livekit_server, room_name, "ghost", hidden=True)
        )
        try:
            assert "observer" in ghost.remote_participants
            await asyncio.sleep(1.0)
            assert "ghost" not in sdks["observer"].remote_participants
        finally:
            await ghost.disconnect()


@pytest.fixture(scope="session")
def short_lived_token(livekit_server: LiveKitServer) -> tuple[str, str, float]:
    """A 1 s token minted early in the session: (room, token, expiry as time.monotonic())."""
    room = "t-server-api-expiry"
    minted = token(livekit_server, room, "short-lived", ttl=timedelta(seconds=1))
    return room, minted, time.monotonic() + 1


async def test_short_lived_token_joins_while_fresh(
    livekit_server: LiveKitServer, short_lived_token: tuple[str, str, float]
) -> None:
    _, minted, _ = short_lived_token
    sdk = rtc.Room()
    await sdk.connect(livekit_server.url, minted)
    try:
        assert sdk.local_participant.identity == "short-lived"
    finally:
        await sdk.disconnect()


async def test_bad_credentials_are_auth_errors(livekit_server: LiveKitServer) -> None:
    async with ServerApi(
        livekit_server.http_url, livekit_server.api_key, "wrong-secret-wrong-secret-wrong-secret"
    ) as bad:
        with pytest.raises(AuthError, match=r"server_api: ListRooms room=\* failed: .*HTTP 401"):
            await bad.list_rooms()
    async with ServerApi(livekit_server.http_url, "no-such-key", livekit_server.api_secret) as bad:
        with pytest.raises(AuthError, match="HTTP 401"):
            await bad.send_data("r", b"x")
        with pytest.raises(AuthError):  # not an RpcError: the call never reached a participant
            await bad.perform_rpc("r", "alice", "m", "p")


async def test_nothing_listening_is_unreachable_quickly() -> None:
    async with ServerApi("http://127.0.0.1:1", "k", SECRET, timeout=3) as nowhere:
        started = time.monotonic()
        with pytest.raises(ServerUnreachableError, match=r"ListRooms .*cannot reach") as err:
            await nowhere.list_rooms()
        assert time.monotonic() - started < 8  # refused at once, not hung
        assert err.value.retriable


async def test_silent_server_times_out_as_unreachable() -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(
        _r: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ServerApi(f"ws://127.0.0.1:{port}", "k", SECRET, timeout=1) as silent:
            started = time.monotonic()
            with pytest.raises(ServerUnreachableError, match=r"no answer .* within 1 s"):
                await silent.create_room("r")
            assert 0.9 < time.monotonic() - started < 10  # bounded by the 1 s timeout, not hung
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_closed_client_refuses_calls(livekit_server: LiveKitServer) -> None:
    client = ServerApi(livekit_server.url, livekit_server.api_key, livekit_server.api_secret)
    assert await client.list_rooms(["t-none"]) == []
    await client.aclose()
    await client.aclose()
    with pytest.raises(RoomError, match="closed"):
        await client.list_rooms()


async def test_expired_token_is_rejected_by_server(livekit_server: LiveKitServer) -> None:
    # The server allows one minute of leeway past `exp`: expire the token well before that.
    expired = make_token(livekit_server, "t-expired", "late", ttl=timedelta(minutes=-5))
    sdk = rtc.Room()
    with pytest.raises(rtc.ConnectError) as err:
        await sdk.connect(livekit_server.url, expired)
    assert "401" in err.value.message and "token is expired" in err.value.message
    assert not sdk.isconnected()
