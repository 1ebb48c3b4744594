"""RPC between our participant and official-SDK peers, both directions, over RPC v2 and v1.

The SDK always advertises client_protocol 2 (RPC over data streams). Each test runs in the modes
of `MODES`:

* ``v2``: our default; requests and successful responses travel as text streams.
* ``v1``: both sides speak plain ``rpc_request``/``rpc_response`` packets (payloads up to
  15,360 bytes). Ours advertises ``client_protocol=0``, so the SDK sends v1; and because the
  SDK cannot be made to advertise 0, our room is told the SDK is at 0 (its `participant_info`,
  the seam RPC reads, is wrapped), so ours sends v1 too. The stream counters prove no stream
  was used.
* ``mixed`` (success only): ours advertises 0 and sees the SDK's real 2: requests from ours and
  responses to the SDK are streams, requests from the SDK and its responses to us are packets.

Server-initiated calls (`ServerApi.perform_rpc`) always travel as v1 packets.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from livekit import rtc
from livekit.protocol import models

from bridge.room.errors import RpcError
from bridge.room.room import Room, RoomOptions
from bridge.room.rpc import RpcInvocationData
from bridge.room.server_api import ServerApi
from bridge.room.types import MAX_RPC_V1_PAYLOAD_BYTES
from tests.conftest import make_token
from tests.interop.conftest import eventually, our_peer, sdk_peer
from tests.services import LiveKitServer

UTF8_PAYLOAD = "héllo → 世界 🎉 ñ"
# ~100 KB of poorly compressible 1- to 4-byte characters: stream chunks split characters.
BIG_PAYLOAD = "".join(random.Random(7).choices("aü€🎉ß中", k=40_000))
MODES = ["v2", "v1"]


def _options(mode: str) -> RoomOptions | None:
    return None if mode == "v2" else RoomOptions(client_protocol=0, capabilities=[])


def _see_as_v1(ours: Room, identity: str) -> None:
    """Make our room report `identity` at client_protocol 0, so our RPC speaks v1 to it."""
    real = ours.participant_info

    def participant_info(who: str) -> models.ParticipantInfo | None:
        info = real(who)
        if info is None or who != identity:
            return info
        downgraded = models.ParticipantInfo()
        downgraded.CopyFrom(info)
        downgraded.client_protocol = 0
        return downgraded

    ours.participant_info = participant_info  # type: ignore[method-assign,assignment]


@dataclass
class Pair:
    """Our participant ("ours") and an SDK participant ("sdk") that see each other."""

    ours: Room
    sdk: rtc.Room
    mode: str

    def streams_used(self) -> int:
        """Text streams our side sent or received (RPC v2 traffic)."""
        return self.ours.counters["streams.sent"] + self.ours.counters["streams.received"]


async def _meet(ours: Room, sdk: rtc.Room, mode: str, sdk_identity: str = "sdk") -> None:
    await eventually(lambda: sdk_identity in ours.remote_participants, what="we see the SDK")
    await eventually(lambda: "ours" in sdk.remote_participants, what="the SDK sees us")
    if mode == "v1":
        _see_as_v1(ours, sdk_identity)


@asynccontextmanager
async def pair(server: LiveKitServer, room: str, mode: str) -> AsyncIterator[Pair]:
    """Ours and an SDK peer in `room`, each knowing the other (and so its client_protocol)."""
    async with (
        our_peer(server, room, "ours", options=_options(mode)) as ours,
        sdk_peer(server, room, "sdk") as sdk,
    ):
        await _meet(ours, sdk, mode)
        yield Pair(ours, sdk, mode)


async def _sdk_error(call: Awaitable[str]) -> rtc.RpcError:
    with pytest.raises(rtc.RpcError) as info:
        await call
    return info.value


async def _our_error(call: Awaitable[object]) -> RpcError:
    with pytest.raises(RpcError) as info:
        await call
    return info.value


def _sdk_reverse(seen: list[rtc.RpcInvocationData]) -> Callable[[rtc.RpcInvocationData], str]:
    def reverse(data: rtc.RpcInvocationData) -> str:
        seen.append(data)
        return data.payload[::-1]

    return reverse


def _our_reverse(seen: list[RpcInvocationData]) -> Callable[[RpcInvocationData], Awaitable[str]]:
    async def reverse(data: RpcInvocationData) -> str:
        seen.append(data)
        return data.payload[::-1]

    return reverse


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("mode", ["v2", "v1", "mixed"])
async def test_success_both_ways(livekit_server: LiveKitServer, room_name: str, mode: str) -> None:
    async with pair(livekit_server, room_name, mode) as p:
        sdk_seen: list[rtc.RpcInvocationData] = []
        our_seen: list[RpcInvocationData] = []
        p.sdk.local_participant.register_rpc_method("reverse", _sdk_reverse(sdk_seen))
        p.ours.local_participant.register_rpc_method("reverse", _our_reverse(our_seen))
        to_sdk, to_ours = await asyncio.gather(
            p.ours.local_participant.perform_rpc(
                destination_identity="sdk", method="reverse", payload=UTF8_PAYLOAD
            ),
            p.sdk.local_participant.perform_rpc(
                destination_identity="ours", method="reverse", payload=UTF8_PAYLOAD
            ),
        )
        assert to_sdk == to_ours == UTF8_PAYLOAD[::-1]
        assert (sdk_seen[0].caller_identity, sdk_seen[0].payload) == ("ours", UTF8_PAYLOAD)
        assert sdk_seen[0].method == "reverse"
        assert (our_seen[0].caller_identity, our_seen[0].payload) == ("sdk", UTF8_PAYLOAD)
        assert our_seen[0].method == "reverse"
        assert sdk_seen[0].request_id and our_seen[0].request_id
        assert our_seen[0].response_timeout > 0
        # An empty payload is a payload, both ways.
        assert (
            await p.ours.local_participant.perform_rpc(
                destination_identity="sdk", method="reverse", payload=""
            )
            == ""
        )
        assert (
            await p.sdk.local_participant.perform_rpc(
                destination_identity="ours", method="reverse", payload=""
            )
            == ""
        )
        if mode == "v1":
            assert p.streams_used() == 0
        elif mode == "v2":
            # 100 KB round trips, far over the v1 limit: only streams carry that.
            to_sdk, to_ours = await asyncio.gather(
                p.ours.local_participant.perform_rpc(
                    destination_identity="sdk", method="reverse", payload=BIG_PAYLOAD
                ),
                p.sdk.local_participant.perform_rpc(
                    destination_identity="ours", method="reverse", payload=BIG_PAYLOAD
                ),
            )
            assert 95_000 < len(BIG_PAYLOAD.encode()) < 105_000
            assert to_sdk == to_ours == BIG_PAYLOAD[::-1]
            # Each call: a request stream one way, a response stream the other way.
            assert p.ours.counters["streams.sent"] == 6
            assert p.ours.counters["streams.received"] == 6
        else:
            # Ours sends its request and its response as streams (the SDK is at 2); the SDK
            # sends its request to us as a packet (we said 0).
            assert p.ours.counters["streams.sent"] == 4
            # The SDK answers a request that came as a stream with a stream, whatever we said.
            assert p.ours.counters["streams.received"] == 2
        assert p.ours.counters["rpc.malformed_request"] == 0
        assert p.ours.counters["rpc.malformed_response"] == 0


async def test_calls_before_the_server_announces_the_sdk(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    """The server tells us about a new participant ~3 s after it joined; calls work meanwhile.

    The SDK knows us from its JoinResponse and calls at once over v2; we answer a caller we do
    not know yet (with a v1-format response stream, the least a recipient can read). Calling it
    before we know it falls back to v1 packets, which the SDK reads too.
    """
    async with our_peer(livekit_server, room_name, "ours") as ours:
        ours.local_participant.register_rpc_method("reverse", _our_reverse([]))
        sdk = rtc.Room()
        await sdk.connect(livekit_server.url, make_token(livekit_server, room_name, "sdk"))
        try:
            sdk.local_participant.register_rpc_method("reverse", _sdk_reverse([]))
            assert "sdk" not in ours.remote_participants
            big = BIG_PAYLOAD[:8_000]  # over the v1 limit in bytes: only a stream carries it
            assert len(big.encode()) > MAX_RPC_V1_PAYLOAD_BYTES
            assert big[::-1] == await sdk.local_participant.perform_rpc(
                destination_identity="ours", method="reverse", payload=big
            )
            assert UTF8_PAYLOAD[::-1] == await ours.local_participant.perform_rpc(
                destination_identity="sdk", method="reverse", payload=UTF8_PAYLOAD
            )
            assert "sdk" not in ours.remote_participants, "too slow to test the early window"
            assert ours.counters["streams.received"] == 1  # the SDK's request
            assert ours.counters["streams.sent"] == 1  # our response; our request was a packet
        finally:
            await sdk.disconnect()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mode", MODES)
async def test_application_error_both_ways(
    livekit_server: LiveKitServer, room_name: str, mode: str
) -> None:
    async with pair(livekit_server, room_name, mode) as p:

        async def sdk_fails(data: rtc.RpcInvocationData) -> str:
            raise rtc.RpcError(4001, "sdk says nö", '{"why": "ü"}')

        async def ours_fails(data: RpcInvocationData) -> str:
            raise RpcError(4002, "ours says nö ✗", '{"why": "€"}')

        async def ours_crashes(data: RpcInvocationData) -> str:
            raise KeyError("not an RpcError")

        p.sdk.local_participant.register_rpc_method("fail", sdk_fails)
        p.ours.local_participant.register_rpc_method("fail", ours_fails)
        p.ours.local_participant.register_rpc_method("crash", ours_crashes)

        ours_got = await _our_error(
            p.ours.local_participant.perform_rpc(
                destination_identity="sdk", method="fail", payload="x"
            )
        )
        assert (ours_got.code, ours_got.message, ours_got.data) == (
            4001,
            "sdk says nö",
            '{"why": "ü"}',
        )
        sdk_got = await _sdk_error(
            p.sdk.local_participant.perform_rpc(
                destination_identity="ours", method="fail", payload="x"
            )
        )
        assert (sdk_got.code, sdk_got.message, sdk_got.data) == (
            4002,
            "ours says nö ✗",
            '{"why": "€"}',
        )
        crashed = await _sdk_error(
            p.sdk.local_participant.perform_rpc(
                destination_identity="ours", method="crash", payload="x"
            )
        )
        assert (crashed.code, crashed.message) == (1500, "Application error in method handler")
        assert p.ours.counters["rpc.handler_error"] == 1
        # Errors always travel as packets: in v2 the only streams are the three requests.
        if mode == "v1":
            assert p.streams_used() == 0
        else:
            assert p.ours.counters["streams.sent"] == 1
            assert p.ours.counters["streams.received"] == 2


@pytest.mark.parametrize("mode", MODES)
async def test_unsupported_method_both_ways(
    livekit_server: LiveKitServer, room_name: str, mode: str
) -> None:
    async with pair(livekit_server, room_name, mode) as p:
        ours_got, sdk_got = await asyncio.gather(
            _our_error(
                p.ours.local_participant.perform_rpc(
                    destination_identity="sdk", method="nope", payload="x"
                )
            ),
            _sdk_error(
                p.sdk.local_participant.perform_rpc(
                    destination_identity="ours", method="nope", payload="x"
                )
            ),
        )
        assert (ours_got.code, ours_got.message) == (1400, "Method not supported at destination")
        assert (sdk_got.code, sdk_got.message) == (1400, "Method not supported at destination")
        assert p.ours.counters["rpc.unsupported_method"] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_response_timeout_both_ways(
    livekit_server: LiveKitServer, room_name: str, mode: str
) -> None:
    async with pair(livekit_server, room_name, mode) as p:
        our_handler_saw: list[RpcInvocationData] = []

        async def sdk_slow(data: rtc.RpcInvocationData) -> str:
            await asyncio.sleep(1.5)
            return "late"

        async def ours_slow(data: RpcInvocationData) -> str:
            our_handler_saw.append(data)
            await asyncio.sleep(1.5)
            return "late"

        p.sdk.local_participant.register_rpc_method("slow", sdk_slow)
        p.ours.local_participant.register_rpc_method("slow", ours_slow)
        started = time.monotonic()
        ours_got, sdk_got = await asyncio.gather(
            _our_error(
                p.ours.local_participant.perform_rpc(
                    destination_identity="sdk", method="slow", payload="x", response_timeout=0.5
                )
            ),
            _sdk_error(
                p.sdk.local_participant.perform_rpc(
                    destination_identity="ours", method="slow", payload="x", response_timeout=0.5
                )
            ),
        )
        assert time.monotonic() - started < 5  # the 0.5 s timeout, not the 15 s default
        assert (ours_got.code, ours_got.message) == (1502, "Response timeout")
        assert (sdk_got.code, sdk_got.message) == (1502, "Response timeout")
        # The SDK's answer arrives after we gave up: dropped and counted, nothing else happens.
        await eventually(
            lambda: p.ours.counters["rpc.late_response"] >= 1, timeout=5, what="late response"
        )
        assert our_handler_saw[0].response_timeout > 0


async def test_calling_an_identity_not_in_the_room(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    """What a caller gets when the callee is not in the room.

    The SFU drops packets to unknown identities, so a participant's call is never acked:
    CONNECTION_TIMEOUT (1501), after our 7 s ack timeout or the SDK's `max_round_trip_latency`
    (1 s here). A server-initiated call is refused by the server with RECIPIENT_NOT_FOUND (1401),
    after about 3 s.
    """
    async with (
        pair(livekit_server, room_name, "v2") as p,
        ServerApi(livekit_server.url, livekit_server.api_key, livekit_server.api_secret) as server,
    ):
        started = time.monotonic()
        ours_got, sdk_got, server_got = await asyncio.gather(
            _our_error(
                p.ours.local_participant.perform_rpc(
                    destination_identity="nobody", method="m", payload="x"
                )
            ),
            _sdk_error(
                p.sdk.local_participant.perform_rpc(
                    destination_identity="nobody",
                    method="m",
                    payload="x",
                    max_round_trip_latency=1.0,
                )
            ),
            _our_error(server.perform_rpc(room_name, "nobody", "m", "x")),
        )
        elapsed = time.monotonic() - started
        assert (ours_got.code, ours_got.message) == (1501, "Connection timeout")
        assert (sdk_got.code, sdk_got.message) == (1501, "Connection timeout")
        assert (server_got.code, server_got.message) == (1401, "Recipient not found")
        assert 6.5 < elapsed < 9
        assert p.ours._rpc.pending_calls == 0


async def test_v1_payload_limits_both_ways(livekit_server: LiveKitServer, room_name: str) -> None:
    """In v1 a request or response over 15,360 UTF-8 bytes is refused (1402 / 1504)."""
    fits = "é" * (MAX_RPC_V1_PAYLOAD_BYTES // 2)  # exactly 15,360 bytes
    over = fits + "x"
    async with pair(livekit_server, room_name, "v1") as p:

        def sdk_answer(data: rtc.RpcInvocationData) -> str:
            return fits if data.payload == "fits" else over

        async def ours_answer(data: RpcInvocationData) -> str:
            return fits if data.payload == "fits" else over

        p.sdk.local_participant.register_rpc_method("echo", lambda d: d.payload)
        p.sdk.local_participant.register_rpc_method("answer", sdk_answer)
        p.ours.local_participant.register_rpc_method("echo", _our_reverse([]))
        p.ours.local_participant.register_rpc_method("answer", ours_answer)

        # Requests: the limit itself passes, one byte more is refused by the caller.
        assert fits == await p.ours.local_participant.perform_rpc(
            destination_identity="sdk", method="echo", payload=fits
        )
        assert fits == await p.sdk.local_participant.perform_rpc(
            destination_identity="ours", method="echo", payload=fits
        )
        ours_got = await _our_error(
            p.ours.local_participant.perform_rpc(
                destination_identity="sdk", method="echo", payload=over
            )
        )
        sdk_got = await _sdk_error(
            p.sdk.local_participant.perform_rpc(
                destination_identity="ours", method="echo", payload=over
            )
        )
        assert (ours_got.code, ours_got.message) == (1402, "Request payload too large")
        assert (sdk_got.code, sdk_got.message) == (1402, "Request payload too large")

        # Responses: the callee refuses to send one over the limit.
        assert fits == await p.ours.local_participant.perform_rpc(
            destination_identity="sdk", method="answer", payload="fits"
        )
        assert fits == await p.sdk.local_participant.perform_rpc(
            destination_identity="ours", method="answer", payload="fits"
        )
        ours_got = await _our_error(
            p.ours.local_participant.perform_rpc(
                destination_identity="sdk", method="answer", payload="over"
            )
        )
        sdk_got = await _sdk_error(
            p.sdk.local_participant.perform_rpc(
                destination_identity="ours", method="answer", payload="over"
            )
        )
        assert (ours_got.code, ours_got.message) == (1504, "Response payload too large")
        assert (sdk_got.code, sdk_got.message) == (1504, "Response payload too large")
        assert p.ours.counters["rpc.response_too_large"] == 1
        assert p.streams_used() == 0


# --------------------------------------------------------------------------- callee leaves


@pytest.mark.parametrize("mode", MODES)
async def test_sdk_callee_leaving_fails_our_pending_call(
    livekit_server: LiveKitServer, room_name: str, mode: str
) -> None:
    async with our_peer(livekit_server, room_name, "ours", options=_options(mode)) as ours:
        sdk = rtc.Room()
        await sdk.connect(livekit_server.url, make_token(livekit_server, room_name, "sdk"))
        try:
            await _meet(ours, sdk, mode)
            invoked = asyncio.Event()

            async def hang(data: rtc.RpcInvocationData) -> str:
                invoked.set()
                await asyncio.sleep(30)
                return "never"

            sdk.local_participant.register_rpc_method("hang", hang)
            call = asyncio.create_task(
                ours.local_participant.perform_rpc(
                    destination_identity="sdk", method="hang", payload="x", response_timeout=20
                )
            )
            await asyncio.wait_for(invoked.wait(), 10)
        finally:
            await sdk.disconnect()
        started = time.monotonic()
        got = await _our_error(call)
        assert (got.code, got.message) == (1503, "Recipient disconnected")
        # As soon as the server's ParticipantUpdate says it left (2-3 s after its leave).
        assert time.monotonic() - started < 5
        assert ours._rpc.pending_calls == 0


@pytest.mark.parametrize("mode", MODES)
async def test_our_callee_leaving_fails_the_sdk_pending_call(
    livekit_server: LiveKitServer, room_name: str, mode: str
) -> None:
    async with sdk_peer(livekit_server, room_name, "sdk") as sdk:
        ours = Room(_options(mode))
        await ours.connect(livekit_server.url, make_token(livekit_server, room_name, "ours"))
        try:
            await _meet(ours, sdk, mode)
            invoked = asyncio.Event()

            async def hang(data: RpcInvocationData) -> str:
                invoked.set()
                await asyncio.sleep(30)
                return "never"

            ours.local_participant.register_rpc_method("hang", hang)
            call = asyncio.create_task(
                sdk.local_participant.perform_rpc(
                    destination_identity="ours", method="hang", payload="x", response_timeout=20
                )
            )
            await asyncio.wait_for(invoked.wait(), 10)
        finally:
            await ours.disconnect()
        started = time.monotonic()
        got = await _sdk_error(call)
        assert (got.code, got.message) == (1503, "Recipient disconnected")
        # The server tells the others 2-3 s after a leave; the SDK adds ~2 s of its own (the
        # same as between two SDK peers).
        assert time.monotonic() - started < 8


# --------------------------------------------------------------------------- server-initiated


@pytest.mark.parametrize("mode", MODES)
async def test_server_initiated_rpc_is_answered_by_our_handler(
    livekit_server: LiveKitServer, room_name: str, mode: str
) -> None:
    seen: list[RpcInvocationData] = []

    async def greet(data: RpcInvocationData) -> str:
        seen.append(data)
        return f"hi {data.payload} ✓"

    async def refuse(data: RpcInvocationData) -> str:
        raise RpcError(4403, "not for you", "ü data")

    async with (
        our_peer(livekit_server, room_name, "ours", options=_options(mode)) as ours,
        ServerApi(livekit_server.url, livekit_server.api_key, livekit_server.api_secret) as server,
    ):
        ours.local_participant.register_rpc_method("greet", greet)
        ours.local_participant.register_rpc_method("refuse", refuse)
        assert await server.perform_rpc(room_name, "ours", "greet", "wörld") == "hi wörld ✓"
        # The server calls from a random identity that is no participant: answered with packets.
        assert seen[0].caller_identity not in ours.remote_participants
        assert seen[0].caller_identity != "ours"
        assert seen[0].payload == "wörld"
        assert 5 < seen[0].response_timeout <= 10
        assert ours.counters["streams.sent"] == 0

        got = await _our_error(server.perform_rpc(room_name, "ours", "refuse", "x"))
        assert (got.code, got.message, got.data) == (4403, "not for you", "ü data")
        got = await _our_error(server.perform_rpc(room_name, "ours", "missing", "x"))
        assert got.code == 1400
        # The server's own v1 limit, checked before it sends anything.
        got = await _our_error(
            server.perform_rpc(room_name, "ours", "greet", "x" * (MAX_RPC_V1_PAYLOAD_BYTES + 1))
        )
        assert got.code == 1402
        assert len(seen) == 1


# --------------------------------------------------------------------------- load


@pytest.mark.parametrize("mode", MODES)
async def test_200_concurrent_calls_both_ways(
    livekit_server: LiveKitServer, room_name: str, mode: str
) -> None:
    async with pair(livekit_server, room_name, mode) as p:

        async def sdk_double(data: rtc.RpcInvocationData) -> str:
            await asyncio.sleep(0.05)
            return data.payload * 2

        async def ours_double(data: RpcInvocationData) -> str:
            await asyncio.sleep(0.05)
            return data.payload * 2

        p.sdk.local_participant.register_rpc_method("double", sdk_double)
        p.ours.local_participant.register_rpc_method("double", ours_double)
        n = 200
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                p.ours.local_participant.perform_rpc(
                    destination_identity="sdk", method="double", payload=f"o{i}-"
                )
                for i in range(n)
            ),
            *(
                p.sdk.local_participant.perform_rpc(
                    destination_identity="ours", method="double", payload=f"s{i}-"
                )
                for i in range(n)
            ),
        )
        elapsed = time.monotonic() - started
        assert results[:n] == [f"o{i}-o{i}-" for i in range(n)]
        assert results[n:] == [f"s{i}-s{i}-" for i in range(n)]
        assert p.ours._rpc.pending_calls == 0
        assert p.ours.counters["rpc.overloaded"] == 0
        assert elapsed < 30, f"{2 * n} calls took {elapsed:.1f} s"
