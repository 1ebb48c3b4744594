"""Our SCTP fixes (bridge.room.sctp) on two aiortc associations joined by an in-memory link.

The link stands in for DTLS: it carries SCTP packets in order, one at a time per direction (as
aiortc's DTLS receive loop does), can drop chosen packets, and records what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiortc
import pytest
from aiortc import RTCDataChannel, RTCDataChannelParameters, rtcsctptransport
from aiortc.rtcsctptransport import (
    SCTP_MAX_PACKET_LENGTH,
    DataChunk,
    RTCSctpTransport,
    SackChunk,
    parse_packet,
)

from bridge.room import sctp


@pytest.fixture(autouse=True)
def patched(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with the patch installed and fast retransmission timers."""
    monkeypatch.delenv("ROOMBUS_STOCK_SCTP", raising=False)
    # Tail losses are recovered by the T3 timer: keep it short so tests stay quick.
    monkeypatch.setattr(rtcsctptransport, "SCTP_RTO_INITIAL", 0.2)
    monkeypatch.setattr(rtcsctptransport, "SCTP_RTO_MIN", 0.05)
    sctp.uninstall()
    assert sctp.install()
    yield
    sctp.uninstall()
    sctp.install()


@dataclass
class _FakeIce:
    role: str


@dataclass
class _End:
    """One side of the in-memory link, posing as an RTCDtlsTransport."""

    _role: str
    state: str = "connected"
    peer: _End | None = None
    receiver: Any = None
    sent: list[bytes] = field(default_factory=list)
    drop: Callable[[int, bytes], bool] = lambda _i, _d: False
    inbox: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    @property
    def transport(self) -> _FakeIce:
        return _FakeIce("controlling" if self._role == "client" else "controlled")

    def _register_data_receiver(self, receiver: Any) -> None:
        self.receiver = receiver

    def _unregister_data_receiver(self, receiver: Any) -> None:
        self.receiver = None

    async def _send_data(self, data: bytes) -> None:
        index = len(self.sent)
        self.sent.append(data)
        assert self.peer is not None
        if not self.drop(index, data):
            self.peer.inbox.put_nowait(data)

    async def pump(self) -> None:
        while True:
            data = await self.inbox.get()
            if self.receiver is not None:
                await self.receiver._handle_data(data)


@dataclass
class _Pair:
    a: RTCSctpTransport
    b: RTCSctpTransport
    link_a: _End
    link_b: _End


@contextlib.asynccontextmanager
async def _associated(initial_tsn: int | None = None) -> AsyncIterator[_Pair]:
    """Two established associations; `initial_tsn` sets a's first TSN (e.g. near wrap-around)."""
    link_a, link_b = _End("client"), _End("server")
    link_a.peer, link_b.peer = link_b, link_a
    a = RTCSctpTransport(link_a)  # type: ignore[arg-type]
    b = RTCSctpTransport(link_b)  # type: ignore[arg-type]
    if initial_tsn is not None:
        # As RTCSctpTransport.__init__ derives them from its random initial TSN.
        a._local_tsn = initial_tsn
        a._last_sacked_tsn = rtcsctptransport.tsn_minus_one(initial_tsn)
        a._advanced_peer_ack_tsn = rtcsctptransport.tsn_minus_one(initial_tsn)
        a._reconfig_request_seq = initial_tsn
    pumps = [asyncio.create_task(link.pump()) for link in (link_a, link_b)]
    try:
        await a.start(b.getCapabilities(), b.port)
        await b.start(a.getCapabilities(), a.port)
        async with asyncio.timeout(5):
            while not (a._association_state == b._association_state == a.State.ESTABLISHED):
                await asyncio.sleep(0.01)
        yield _Pair(a, b, link_a, link_b)
    finally:
        await a.stop()
        await b.stop()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def _channels(
    pair: _Pair, *, ordered: bool = True, max_retransmits: int | None = None
) -> tuple[RTCDataChannel, RTCDataChannel]:
    def params() -> RTCDataChannelParameters:
        return RTCDataChannelParameters(
            label="test", negotiated=True, id=1, ordered=ordered, maxRetransmits=max_retransmits
        )

    return RTCDataChannel(pair.a, params()), RTCDataChannel(pair.b, params())


def _collect(channel: RTCDataChannel) -> list[bytes]:
    got: list[bytes] = []
    channel.on("message", got.append)
    return got


async def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def _data_packets(sent: list[bytes]) -> list[list[Any]]:
    packets = [parse_packet(p)[3] for p in sent]
    return [chunks for chunks in packets if any(isinstance(c, DataChunk) for c in chunks)]


def _message(i: int, size: int = 256) -> bytes:
    head = i.to_bytes(4, "big")
    return head + bytes([i % 251]) * (size - len(head))


# ---------------------------------------------------------------------------- installing


def test_install_is_idempotent_and_uninstall_restores_stock() -> None:
    assert sctp.is_installed()
    assert sctp.install()
    assert RTCSctpTransport._transmit is sctp._transmit
    sctp.uninstall()
    assert not sctp.is_installed()
    assert RTCSctpTransport._transmit is not sctp._transmit
    assert RTCSctpTransport._transmit.__module__ == "aiortc.rtcsctptransport"


def test_unknown_aiortc_version_keeps_stock_behaviour(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sctp.uninstall()
    monkeypatch.setattr(aiortc, "__version__", "1.99.0")
    with caplog.at_level("WARNING", logger="roombus.room.sctp"):
        assert not sctp.install()
    assert not sctp.is_installed()
    assert RTCSctpTransport._transmit.__module__ == "aiortc.rtcsctptransport"
    assert "1.99.0" in caplog.text and "stock SCTP" in caplog.text


def test_environment_switch_keeps_stock_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    sctp.uninstall()
    monkeypatch.setenv("ROOMBUS_STOCK_SCTP", "1")
    assert not sctp.install()
    assert RTCSctpTransport._data_channel_flush.__module__ == "aiortc.rtcsctptransport"


def test_supported_versions() -> None:
    assert sctp.supported("1.16.0")
    assert not sctp.supported("1.17.0")


# ---------------------------------------------------------------------------- send path


async def test_small_messages_are_bundled_and_arrive_in_order() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        pair.link_a.sent.clear()
        messages = [_message(i) for i in range(500)]
        for message in messages:
            tx.send(message)
        await _wait_for(lambda: len(got) == len(messages))
        assert got == messages
        assert tx.bufferedAmount == 0
        packets = _data_packets(pair.link_a.sent)
        # 256-byte messages: four fit in one packet; stock aiortc sends one per packet.
        assert len(packets) <= len(messages) // 3
        assert max(len(p) for p in pair.link_a.sent) <= SCTP_MAX_PACKET_LENGTH


async def test_large_and_empty_messages_keep_their_boundaries() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got: list[bytes | str] = []
        rx.on("message", got.append)
        await _wait_for(lambda: tx.readyState == "open")
        messages: list[bytes | str] = [
            _message(1, 60_000),
            b"",
            "text",
            "",
            _message(2, 10),
            _message(3, 1_161),
            _message(4, 1_162),
        ]
        for message in messages:
            tx.send(message)
        await _wait_for(lambda: len(got) == len(messages))
        assert got == messages


async def test_a_burst_of_sends_schedules_one_flush() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        calls = 0
        flush = pair.a._data_channel_flush

        async def counting_flush() -> None:
            nonlocal calls
            calls += 1
            await flush()

        pair.a._data_channel_flush = counting_flush  # type: ignore[method-assign]
        for i in range(100):
            tx.send(_message(i))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert calls == 1
        await _wait_for(lambda: len(got) == 100)


async def test_oversized_message_is_refused_before_queueing() -> None:
    async with _associated() as pair:
        tx, _rx = _channels(pair)
        await _wait_for(lambda: tx.readyState == "open")
        pair.a._remote_max_message_size = 1000
        with pytest.raises(ValueError, match="only supports messages up to 1000"):
            tx.send(b"x" * 1001)
        assert tx.bufferedAmount == 0


async def test_flush_hands_sctp_only_what_the_window_can_take() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        for i in range(2_000):
            tx.send(_message(i))
        # Before the flush runs everything counts as buffered (flow control sees it all).
        assert tx.bufferedAmount == 2_000 * 256
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        # The initial window is small: most stays in the data channel queue, still buffered.
        assert tx.bufferedAmount > 1_000 * 256
        assert len(pair.a._outbound_queue) < 20
        await _wait_for(lambda: len(got) == 2_000)
        assert tx.bufferedAmount == 0


# ---------------------------------------------------------------------------- reliability


async def test_ordered_reliable_delivery_survives_loss() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        # Lose every 7th packet each way (DATA and SACKs), the first few 3 times in a row.
        pair.link_a.drop = lambda i, _d: i % 7 == 3 or i in (10, 11, 12)
        pair.link_b.drop = lambda i, _d: i % 7 == 5
        messages = [_message(i, 256 if i % 10 else 3_000) for i in range(400)]
        for message in messages:
            tx.send(message)
        await _wait_for(lambda: len(got) == len(messages), timeout=30)
        assert got == messages
        retransmitted = [
            c for p in _data_packets(pair.link_a.sent) for c in p if isinstance(c, DataChunk)
        ]
        assert len(retransmitted) > len({c.tsn for c in retransmitted})  # loss was repaired


async def test_tail_loss_is_repaired_by_the_t3_timer() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        first = len(pair.link_a.sent)
        # The only packet of the burst is lost: no later SACK can report a gap.
        pair.link_a.drop = lambda i, _d: i == first
        tx.send(_message(1))
        await _wait_for(lambda: got == [_message(1)], timeout=5)


async def test_lossy_unordered_channel_abandons_lost_messages_and_goes_on() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair, ordered=False, max_retransmits=0)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        first = len(pair.link_a.sent)
        pair.link_a.drop = lambda i, d: i == first + 1
        for i in range(40):
            tx.send(_message(i))
            await asyncio.sleep(0.002)
        await _wait_for(lambda: len(got) >= 36, timeout=10)
        await asyncio.sleep(0.3)
        assert len(got) < 40  # the dropped packet's messages were never resent
        assert len(set(got)) == len(got)
        # The association is healthy: a later message still gets through.
        tx.send(b"after")
        await _wait_for(lambda: b"after" in got, timeout=5)


# ---------------------------------------------------------------------------- receive path


def _sacks(sent: list[bytes]) -> list[SackChunk]:
    return [c for p in sent for c in parse_packet(p)[3] if isinstance(c, SackChunk)]


async def test_receiver_acknowledges_every_second_packet() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        pair.link_b.sent.clear()
        # Large messages: one full packet each, arriving as one backlog.
        messages = [_message(i, 1_161) for i in range(200)]
        for message in messages:
            tx.send(message)
        await _wait_for(lambda: len(got) == len(messages))
        await asyncio.sleep(sctp.SACK_DELAY + 0.1)
        data_packets = len(_data_packets(pair.link_a.sent))
        sacks = _sacks(pair.link_b.sent)
        assert data_packets >= 200
        assert len(sacks) <= data_packets // 2 + 10
        # The last SACK acknowledges everything (the odd packet out is not left unacked).
        assert sacks[-1].cumulative_tsn == pair.a._last_sacked_tsn
        assert not pair.a._sent_queue


def _sack_timer(transport: RTCSctpTransport) -> object:
    timer: object = getattr(transport, "_rb_sack_handle")  # noqa: B009 - set by the patch
    return timer


async def test_a_lone_packet_is_acknowledged_after_the_delay_a_second_one_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sctp, "SACK_DELAY", 1.0)  # long enough to tell "at once" from it
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        await _wait_for(lambda: _sack_timer(pair.b) is None and not pair.b._sack_needed)
        pair.link_b.sent.clear()
        tx.send(_message(0, 100))
        await _wait_for(lambda: len(got) == 1)
        assert _sacks(pair.link_b.sent) == []  # delivered; its SACK waits for a second packet
        assert _sack_timer(pair.b) is not None
        tx.send(_message(1, 100))
        await _wait_for(lambda: len(got) == 2)
        assert len(_sacks(pair.link_b.sent)) == 1  # sent with the second packet, at once
        assert _sack_timer(pair.b) is None
        tx.send(_message(2, 100))
        await _wait_for(lambda: len(got) == 3)
        assert len(_sacks(pair.link_b.sent)) == 1
        await _wait_for(lambda: len(_sacks(pair.link_b.sent)) == 2)  # the lone third, later
        assert _sacks(pair.link_b.sent)[-1].cumulative_tsn == pair.a._last_sacked_tsn
        await _wait_for(lambda: not pair.a._sent_queue)


async def test_a_gap_is_reported_at_once() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        first = len(pair.link_a.sent)
        pair.link_a.drop = lambda i, _d: i == first
        pair.link_b.sent.clear()
        for i in range(3):
            tx.send(_message(i, 1_161))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        sacks = _sacks(pair.link_b.sent)
        gap_sacks = [s for s in sacks if s.gaps]
        # Each packet after the gap is answered with a SACK carrying the gap.
        assert len(gap_sacks) >= 2


async def test_sender_keeps_within_the_peer_receive_window() -> None:
    async with _associated() as pair:
        tx, rx = _channels(pair)
        got = _collect(rx)
        await _wait_for(lambda: tx.readyState == "open")
        window = 3_000
        send_sack = pair.b._send_sack

        async def small_window_sack() -> None:
            # A peer whose reader lags: it keeps advertising only a small free buffer.
            pair.b._advertised_rwnd = window
            await send_sack()

        pair.b._send_sack = small_window_sack  # type: ignore[method-assign]
        # The first SACK tells the sender about the small window (before it, the INIT's applies).
        tx.send(_message(0))
        await _wait_for(lambda: len(got) == 1 and pair.a._flight_size == 0)
        for i in range(1, 400):
            tx.send(_message(i))
        most = 0
        while len(got) < 400:
            most = max(most, pair.a._flight_size)
            await asyncio.sleep(0)
        # Stock aiortc would let the congestion window (tens of KB by now) fill up instead.
        assert most <= window + 300, most
        assert got == [_message(i) for i in range(400)]
