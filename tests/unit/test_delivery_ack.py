"""Delivery tracking: a `Delivery` resolves once the peer's cumulative TSN ack covers a message.

First the bookkeeping alone (`bridge.room.delivery`), then through two real aiortc
associations on the in-memory link of test_sctp, with our SCTP patch and with stock aiortc
(`ROOMBUS_STOCK_SCTP=1`: delivery tracking stays on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiortc
import pytest
from aiortc import rtcsctptransport
from aiortc.rtcsctptransport import DataChunk, parse_packet

from bridge.room import sctp
from bridge.room.datachannel import FlowControlledChannel
from bridge.room.delivery import Delivery, DeliveryTracker, tsn_gte
from bridge.room.errors import NotConnectedError
from bridge.room.types import Counters
from tests.unit.test_sctp import _associated, _channels, _collect, _message, _wait_for

WRAP = 0xFFFFFFFF


# ---------------------------------------------------------------------------- bookkeeping


def test_serial_number_comparison_wraps_around() -> None:
    assert tsn_gte(5, 5)
    assert tsn_gte(6, 5) and not tsn_gte(5, 6)
    assert tsn_gte(0, WRAP) and not tsn_gte(WRAP, 0)
    assert tsn_gte(3, WRAP - 3) and not tsn_gte(WRAP - 3, 3)
    assert tsn_gte(0x7FFFFFFF, 0)  # just under half the space ahead


async def test_acknowledgement_resolves_in_tsn_order_across_wrap_around() -> None:
    tracker = DeliveryTracker()
    deliveries = [Delivery() for _ in range(4)]
    for delivery, tsn in zip(deliveries, (WRAP - 1, WRAP, 0, 2), strict=True):
        tracker.add(delivery)
        delivery.tsn = tsn
    assert tracker.acknowledge(WRAP - 2) == 0  # older than everything (e.g. a stale SACK)
    assert tracker.acknowledge(WRAP) == 2
    assert [d.done() for d in deliveries] == [True, True, False, False]
    assert tracker.acknowledge(1) == 1  # covers TSN 0 after the wrap, not 2
    assert not deliveries[3].done()
    assert tracker.acknowledge(7) == 1
    assert len(tracker) == 0
    for delivery in deliveries:
        await delivery
        assert delivery.failed() is None


async def test_a_message_not_yet_chunked_holds_back_later_ones() -> None:
    tracker = DeliveryTracker()
    first, second = Delivery(), Delivery()
    tracker.add(first)
    tracker.add(second)
    assert tracker.acknowledge(100) == 0  # first has no TSN yet: nothing behind it is known
    first.tsn, second.tsn = 10, 11
    assert tracker.acknowledge(10) == 1
    assert not second.done()


async def test_failing_all_fails_pending_and_later_deliveries_with_a_retriable_error() -> None:
    tracker = DeliveryTracker()
    pending = Delivery()
    tracker.add(pending)
    assert tracker.fail_all(NotConnectedError("gone"), final=True) == 1
    with pytest.raises(NotConnectedError) as caught:
        await pending
    assert caught.value.retriable
    late = Delivery()
    tracker.add(late)
    assert late.done() and isinstance(late.failed(), NotConnectedError)
    assert len(tracker) == 0


async def test_a_waiter_that_gives_up_does_not_cancel_the_delivery() -> None:
    tracker = DeliveryTracker()
    delivery = Delivery()
    tracker.add(delivery)
    delivery.tsn = 1
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await delivery
    tracker.acknowledge(1)
    await delivery
    assert delivery.failed() is None


# ---------------------------------------------------------------------------- with aiortc


@pytest.fixture(params=["patched", "stock"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Our SCTP patch on, or stock aiortc; delivery tracking installed in both."""
    monkeypatch.setattr(rtcsctptransport, "SCTP_RTO_INITIAL", 0.2)
    monkeypatch.setattr(rtcsctptransport, "SCTP_RTO_MIN", 0.05)
    sctp.uninstall()
    if request.param == "stock":
        monkeypatch.setenv("ROOMBUS_STOCK_SCTP", "1")
    else:
        monkeypatch.delenv("ROOMBUS_STOCK_SCTP", raising=False)
    assert sctp.install() == (request.param == "patched")
    assert sctp.install_delivery_tracking()
    yield request.param
    monkeypatch.delenv("ROOMBUS_STOCK_SCTP", raising=False)
    sctp.uninstall()
    sctp.install()


@pytest.mark.parametrize("initial_tsn", [None, WRAP - 20])
async def test_every_delivery_resolves_only_once_the_peer_has_the_message(
    mode: str, initial_tsn: int | None
) -> None:
    async with _associated(initial_tsn) as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        channel = FlowControlledChannel(tx, Counters(), lossy=False)
        await _wait_for(lambda: tx.readyState == "open")
        # Small, multi-fragment and single-fragment messages; the TSNs cross 2**32.
        messages = [_message(i, 3_000 if i % 7 == 0 else 200) for i in range(60)]
        early: list[int] = []

        def check(i: int) -> None:
            # The peer's SCTP delivers to the channel before it acknowledges.
            if messages[i] not in got:
                early.append(i)

        deliveries = []
        for i, message in enumerate(messages):
            delivery = channel.send_tracked(message)
            delivery.add_done_callback(lambda _f, i=i: check(i))
            deliveries.append(delivery)
            if i % 10 == 0:
                await asyncio.sleep(0)
        async with asyncio.timeout(10):
            for delivery in deliveries:
                await delivery
        assert early == []
        assert got == messages
        assert channel.pending_deliveries == 0
        tsns = [d.tsn for d in deliveries]
        assert all(t is not None for t in tsns)
        if initial_tsn is not None:
            assert any(t is not None and t < 1_000 for t in tsns)  # wrapped


async def test_a_multi_fragment_message_waits_for_its_last_chunk(mode: str) -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        channel = FlowControlledChannel(tx, Counters(), lossy=False)
        await _wait_for(lambda: tx.readyState == "open")
        start = pair.a._local_tsn
        delivery = channel.send_tracked(_message(0, 5_000))  # 5 chunks of at most 1,200 bytes
        await asyncio.wait_for(delivery, 5)
        assert delivery.tsn == (start + 4) % 2**32
        assert got == [_message(0, 5_000)]


async def test_closing_the_association_fails_pending_deliveries(mode: str) -> None:
    async with _associated() as pair:
        tx, _rx = _channels(pair)
        channel = FlowControlledChannel(tx, Counters(), lossy=False)
        await _wait_for(lambda: tx.readyState == "open")
        pair.link_a.drop = lambda _i, _d: True  # the peer never gets them: nothing is acked
        deliveries = [channel.send_tracked(_message(i)) for i in range(5)]
        await asyncio.sleep(0.05)
        assert not any(d.done() for d in deliveries)
        await pair.a.stop()
        for delivery in deliveries:
            with pytest.raises(NotConnectedError):
                await asyncio.wait_for(delivery, 1)
        # The channel is closed now: no new tracked send.
        with pytest.raises(NotConnectedError):
            channel.send_tracked(b"late")


async def test_the_session_failing_its_deliveries_at_once(mode: str) -> None:
    async with _associated() as pair:
        tx, _rx = _channels(pair)
        channel = FlowControlledChannel(tx, Counters(), lossy=False)
        await _wait_for(lambda: tx.readyState == "open")
        pair.link_a.drop = lambda _i, _d: True
        delivery = channel.send_tracked(_message(1))
        assert channel.fail_deliveries("signalling lost") == 1
        with pytest.raises(NotConnectedError, match="signalling lost"):
            await delivery


def _data_chunks(sent: list[bytes]) -> list[DataChunk]:
    return [c for p in sent for c in parse_packet(p)[3] if isinstance(c, DataChunk)]


async def test_the_last_chunk_of_a_burst_asks_for_an_immediate_sack() -> None:
    sctp.uninstall()
    assert sctp.install() and sctp.install_delivery_tracking()
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        channel = FlowControlledChannel(tx, Counters(), lossy=False)
        await _wait_for(lambda: tx.readyState == "open")
        first = len(pair.link_a.sent)
        tx.send(_message(0))  # untracked: no flag
        await _wait_for(lambda: len(got) == 1)
        untracked = _data_chunks(pair.link_a.sent[first:])
        assert untracked and not any(c.flags & sctp.SCTP_DATA_SACK_IMMEDIATELY for c in untracked)
        first = len(pair.link_a.sent)
        deliveries = [channel.send_tracked(_message(i)) for i in range(1, 4)]
        for delivery in deliveries:
            await asyncio.wait_for(delivery, 5)
        chunks = _data_chunks(pair.link_a.sent[first:])
        flagged = [c for c in chunks if c.flags & sctp.SCTP_DATA_SACK_IMMEDIATELY]
        # One bundle of three: only its last chunk carries the flag.
        assert flagged and flagged[-1] is chunks[-1]
        assert len(flagged) < len(chunks)


async def test_lossy_channels_are_not_tracked() -> None:
    async with _associated() as pair:
        tx, _rx = _channels(pair, ordered=False, max_retransmits=0)
        channel = FlowControlledChannel(tx, Counters(), lossy=True)
        await _wait_for(lambda: tx.readyState == "open")
        with pytest.raises(ValueError, match="lossy"):
            channel.send_tracked(b"x")


async def test_unknown_aiortc_version_falls_back_to_hand_off_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sctp.uninstall_delivery_tracking()
    monkeypatch.setattr(aiortc, "__version__", "1.99.0")
    try:
        async with _associated() as pair:
            tx, _rx = _channels(pair)
            with caplog.at_level("WARNING", logger="roombus.room.sctp"):
                channel = FlowControlledChannel(tx, Counters(), lossy=False)
            assert not sctp.delivery_tracking()
            assert "delivery tracking" in caplog.text
            await _wait_for(lambda: tx.readyState == "open")
            delivery = channel.send_tracked(b"x")
            assert delivery.done() and delivery.failed() is None
    finally:
        monkeypatch.undo()
        sctp.uninstall_delivery_tracking()  # forgets the refusal
        assert sctp.install_delivery_tracking()
