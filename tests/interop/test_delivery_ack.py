"""Delivery tracking against the real livekit-server: "delivered" means the server has it.

An awaited `Delivery` resolves on the server's SCTP acknowledgement. The proof used here: once
every delivery resolved, our participant's outgoing DTLS traffic is cut (nothing more can leave
it: no retransmission could repair anything), and the official-SDK peer still receives every
packet. And when the session is lost before the acknowledgement, the waiter fails with the
retriable `NotConnectedError`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import pytest
from livekit import rtc

from bridge.room.delivery import Delivery
from bridge.room.errors import NotConnectedError
from bridge.room.events import DataReceived, Reconnected
from bridge.room.room import Room
from tests.interop.conftest import eventually, our_peer, sdk_peer
from tests.services import LiveKitServer


def _collect(sdk: rtc.Room) -> list[bytes]:
    got: list[bytes] = []
    sdk.on("data_received", lambda packet: got.append(packet.data))
    return got


def _dtls(ours: Room) -> Any:
    session = ours._session
    assert session is not None and session.reliable is not None
    return session.reliable.channel.transport.transport


def _cut_outgoing(ours: Room) -> None:
    """From now on nothing our participant sends on its publisher connection leaves it."""

    async def drop(_data: bytes) -> None:
        return None

    _dtls(ours)._send_data = drop


async def test_every_awaited_delivery_reaches_the_sdk_peer_even_if_we_go_silent(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        got = _collect(sdk)
        await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
        n = 300
        deliveries: list[Delivery] = []
        for i in range(n):
            delivery = await ours.local_participant.publish_data_tracked(
                f"d{i}".encode(), topic="ack"
            )
            deliveries.append(delivery)
        async with asyncio.timeout(20):
            for delivery in deliveries:
                await delivery
        _cut_outgoing(ours)  # as if the bridge were SIGKILLed right now
        await eventually(lambda: len(got) >= n, what=f"{n} packets at the sdk peer")
        assert got == [f"d{i}".encode() for i in range(n)]


async def test_wait_delivered_on_publish_data_and_streams(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        got = _collect(sdk)
        texts: list[str] = []

        async def on_text(reader: rtc.TextStreamReader, _identity: str) -> None:
            texts.append(await reader.read_all())

        readers: set[asyncio.Task[None]] = set()

        def on_stream(reader: rtc.TextStreamReader, identity: str) -> None:
            task = asyncio.ensure_future(on_text(reader, identity))
            readers.add(task)
            task.add_done_callback(readers.discard)

        sdk.register_text_stream_handler("t", on_stream)
        await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
        await ours.local_participant.publish_data(b"one", wait_delivered=True)
        long_text = "x" * 40_000  # header, chunks and trailer: the trailer's delivery counts
        await ours.local_participant.send_text(long_text, topic="t", wait_delivered=True)
        await ours.local_participant.send_text("short", topic="t", wait_delivered=True)
        await ours.local_participant.send_bytes(b"b" * 20_000, topic="b", wait_delivered=True)
        # Lossy packets are not tracked: wait_delivered returns at once.
        await ours.local_participant.publish_data(b"lossy", reliable=False, wait_delivered=True)
        _cut_outgoing(ours)
        await eventually(lambda: b"one" in got, what="the packet at the sdk peer")
        await eventually(lambda: len(texts) == 2, what="both texts at the sdk peer")
        # Each is read by its own task: the short one may be complete first.
        assert sorted(texts) == sorted([long_text, "short"])


async def test_a_lost_session_fails_pending_deliveries_then_a_resend_is_delivered(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        got = _collect(sdk)
        await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
        _cut_outgoing(ours)  # in flight, never acknowledged
        pending = [
            await ours.local_participant.publish_data_tracked(f"p{i}".encode()) for i in range(5)
        ]
        await asyncio.sleep(0.2)
        assert not any(d.done() for d in pending)
        async with ours.events(Reconnected) as reconnected:
            session = ours._session
            assert session is not None
            await session.signal.close()  # the connection to the server is lost
            for delivery in pending:
                with pytest.raises(NotConnectedError) as caught:
                    await asyncio.wait_for(delivery, 10)
                assert caught.value.retriable
            await asyncio.wait_for(anext(reconnected), 30)
        # After the rejoin the caller retries, and this time it is delivered.
        for i in range(5):
            await ours.local_participant.publish_data(f"p{i}".encode(), wait_delivered=True)
        _cut_outgoing(ours)
        await eventually(lambda: len(got) >= 5, what="the resent packets at the sdk peer")
        assert got[-5:] == [f"p{i}".encode() for i in range(5)]


async def test_disconnecting_fails_pending_deliveries(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    async with our_peer(livekit_server, room_name, "ours") as ours:
        _cut_outgoing(ours)
        delivery = await ours.local_participant.publish_data_tracked(b"never")
        await ours.disconnect()
        with pytest.raises(NotConnectedError):
            await asyncio.wait_for(delivery, 5)
        with pytest.raises(NotConnectedError):
            await ours.local_participant.publish_data(b"after", wait_delivered=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def test_delivery_latency_is_reported(
    livekit_server: LiveKitServer, room_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """500 packets, one in flight at a time, then 500 paced with up to 50 in flight: print waits.

    Figures only (no timed assertion): the wait is one round trip to the server plus however
    long the server delays its SACK.
    """
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        got = _collect(sdk)
        await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
        n = 500
        serial: list[float] = []
        for i in range(n):
            start = time.perf_counter()
            await ours.local_participant.publish_data(f"s{i}".encode(), wait_delivered=True)
            serial.append((time.perf_counter() - start) * 1000)
        window: list[float] = []
        in_flight: list[Delivery] = []
        for i in range(n):
            start = time.perf_counter()
            delivery = await ours.local_participant.publish_data_tracked(f"w{i}".encode())
            delivery.add_done_callback(
                lambda _f, start=start: window.append((time.perf_counter() - start) * 1000)
            )
            in_flight.append(delivery)
            if len(in_flight) >= 50:
                await in_flight.pop(0)
            await asyncio.sleep(0.001)  # paced, about 1,000 packets/s at most
        for delivery in in_flight:
            await delivery
        await eventually(lambda: len(got) >= 2 * n, what="every packet at the sdk peer")
        with capsys.disabled():
            for name, values in (("one in flight", serial), ("paced, up to 50", window)):
                print(
                    f"\ndelivery wait ({name}, n={len(values)}): "
                    f"p50 {statistics.median(values):.2f} ms, "
                    f"p99 {_percentile(values, 0.99):.2f} ms, max {max(values):.2f} ms"
                )


async def test_new_data_takes_the_synchronous_send_path(
    livekit_server: LiveKitServer, room_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the real server, new data goes out through `sctp._send_packet_sync`.

    That path is an optimization that quietly falls back to aiortc's awaited one when the
    internals it reads are not as expected (a newer aiortc, another ICE protocol): this makes
    the fallback visible. Every packet is still delivered.
    """
    from bridge.room import sctp

    sent: list[int] = []
    original = sctp._send_packet_sync

    def counting(route: Any, packet: bytes) -> None:
        sent.append(len(packet))
        original(route, packet)

    monkeypatch.setattr(sctp, "_send_packet_sync", counting)
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        got = _collect(sdk)
        await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
        before = len(sent)
        for i in range(50):
            await ours.local_participant.publish_data(f"m{i}".encode(), wait_delivered=True)
        await eventually(lambda: len(got) == 50, what="every packet at the sdk peer")
    assert got == [f"m{i}".encode() for i in range(50)]
    assert len(sent) - before >= 50  # one packet each at least: each waited for its SACK


async def test_received_packets_take_the_direct_route(
    livekit_server: LiveKitServer, room_name: str
) -> None:
    """Against the real server, SCTP packets are handled in the datagram callback.

    `bridge.room.direct_receive` falls back to aiortc's queued route quietly (an unknown
    version, a busy stock reader): this makes the fallback visible. Packets both ways arrive
    complete and in order, and the server's SACKs (which resolve our deliveries) come that way.
    """
    from bridge.room import direct_receive

    assert direct_receive.is_installed()
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        got = _collect(sdk)
        ours_got: list[bytes] = []

        def on_data(event: DataReceived) -> None:
            ours_got.append(event.packet.data)

        ours.on(DataReceived, on_data)
        await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
        direct = _dtls(ours).transport._connection._rb_direct
        assert direct is not None
        before = direct.handled
        for i in range(200):
            await ours.local_participant.publish_data(f"m{i}".encode(), wait_delivered=True)
        for i in range(200):
            await sdk.local_participant.publish_data(f"s{i}".encode(), reliable=True)
        await eventually(lambda: len(got) == 200, what="every packet at the sdk peer")
        await eventually(lambda: len(ours_got) == 200, what="every packet at ours")
        handled = direct.handled - before
    assert got == [f"m{i}".encode() for i in range(200)]
    assert ours_got == [f"s{i}".encode() for i in range(200)]
    assert handled >= 200  # at least the SACKs of the 200 awaited deliveries
    print(f"\ndirect route: {handled} records, {direct.resumed} finished as a task")
