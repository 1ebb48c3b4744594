"""Throughput fixes for aiortc's SCTP association, applied by patching `RTCSctpTransport`.

Why: profiling a saturated reliable data channel (bench/room_bench.py) showed aiortc's SCTP
spending its time on avoidable work, not on the network:

1. **A task per message.** `_data_channel_send` schedules `ensure_future(_data_channel_flush())`
   for every message; a burst of N sends makes N tasks that each find little or nothing to do.
   Here one flush is scheduled per loop turn while none is pending, as a plain callback, and
   new data goes down DTLS and ICE without the five coroutines of the stock send path (none of
   them ever suspends: DTLS encrypts in memory and aioice sends with the datagram transport's
   synchronous `sendto`). Retransmissions, FORWARD-TSN, stream resets and any other ICE
   protocol keep the stock, awaited path.
2. **One DATA chunk per packet.** `_transmit` sends every chunk in its own SCTP packet (hence its
   own DTLS record, `sendto` and, at the peer, its own SACK), so 256-byte messages cost a packet
   each. Here new chunks are bundled into packets of up to `SCTP_MAX_PACKET_LENGTH` bytes
   (RFC 9260 §6.10), and the flush hands SCTP as many queued messages as the congestion window
   can take at once (stock aiortc moves one message at a time) so that there is something to
   bundle.
3. **An O(n) scan per transmit.** `_transmit` walks the whole sent queue looking for chunks
   marked for retransmission on every call (every SACK and every send). With a large window the
   sent queue holds thousands of chunks, so the cost grows with the amount in flight, which in
   turn grows while the sender falls behind. Chunks are only ever marked in two places (a SACK
   with gap blocks, and the T3 timer); the scan now runs only after one of those until it has
   completed once.
4. **A SACK per packet.** `_handle_data` answers every packet that carried DATA with a SACK.
   Here a SACK goes out for every second such packet (RFC 9260 §6.2 "at least every second
   packet"), at once when the packet showed a gap or duplicate, and otherwise after
   `SACK_DELAY` (a timer, as RFC 9260 §6.2 allows up to 200 ms and Linux, usrsctp and pion use
   200 ms): a lone packet in flight waits that long for its SACK, unless a second one arrives.
   At a few dozen packets per second per room (a busy room sending to the bridge) that halves
   the SACKs; each costs a DTLS record and a `sendto`. Data reaches the application on arrival;
   only the sender's window waits, and the SDKs' senders never wait on a SACK.

5. **The peer's receive window is ignored.** Stock aiortc limits what it sends only by its
   congestion window; the `a_rwnd` of the peer's SACKs is read once (as the initial ssthresh)
   and never again. A sender faster than livekit-server's reader overruns its receive buffer;
   the excess is dropped and recovered only by the retransmission timer (at least 1 s), which
   showed as one-second delivery gaps in the benchmark. Here new data goes out only while the
   bytes in flight stay below the last advertised window (RFC 9260 §6.1 rule A), with one chunk
   allowed as a probe when the window is closed and nothing is in flight.

What is unchanged: TSN and stream-sequence assignment, congestion control (cwnd, ssthresh, fast
recovery, burst limit), retransmission and abandonment (partial reliability), stream resets and
`bufferedAmount` accounting (a message leaves `bufferedAmount` when it is handed to SCTP, as in
aiortc). Ordering and reliability rest on those, so they are not touched.

6. **No way to know what the peer has.** Delivery tracking (`install_delivery_tracking`, see
   `bridge.room.delivery`): a message sent as `TrackedBytes` carries a `Delivery`; when SCTP cuts
   it into chunks the delivery learns the TSN of its last chunk, and every SACK resolves the
   deliveries its cumulative TSN ack covers (hooked where aiortc updates its ack point, after
   each SACK); closing the association fails the pending ones with `NotConnectedError`. So that
   a lone message is not left waiting for the peer's delayed-ack timer (pion acknowledges every
   second packet, otherwise after 200 ms), the last DATA chunk of a transmit burst carries the
   SACK-IMMEDIATELY bit (RFC 7053) while deliveries are pending.

What is unchanged: TSN and stream-sequence assignment, congestion control (cwnd, ssthresh, fast
recovery, burst limit), retransmission and abandonment (partial reliability), stream resets and
`bufferedAmount` accounting (a message leaves `bufferedAmount` when it is handed to SCTP, as in
aiortc). Ordering and reliability rest on those, so they are not touched.

The patch is process-wide (class attributes) and applies only to aiortc versions it was written
against (`SUPPORTED_VERSIONS`); on any other version `install()` logs a warning and leaves stock
behaviour. `ROOMBUS_STOCK_SCTP=1` in the environment also keeps stock behaviour (for comparisons
and as an escape hatch). Delivery tracking only observes (it changes nothing on the wire), so it
is installed separately and stays on with `ROOMBUS_STOCK_SCTP=1`; there its TSNs are taken in
aiortc's own `_send` and no SACK-IMMEDIATELY bit is set (a lone message may then wait up to the
peer's delayed-ack time). On an aiortc version not in `SUPPORTED_VERSIONS` it is not installed:
`delivery_tracking()` is False and callers (`FlowControlledChannel`) fall back, with a
warning, to treating hand-off as delivery. Remove this module once aiortc does the same
upstream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from struct import pack
from typing import Any

import aiortc
from aioice.ice import StunProtocol as _StunProtocol
from aiortc import rtcdtlstransport, rtcsctptransport
from aiortc.utils import uint16_add as _uint16_add
from OpenSSL import SSL

from bridge.room.delivery import Delivery, DeliveryTracker, connection_lost

# Typed as Any on purpose: this module works on aiortc's private internals.
_sctp: Any = rtcsctptransport

log = logging.getLogger("roombus.room.sctp")

# The aiortc versions whose RTCSctpTransport internals this module was checked against.
SUPPORTED_VERSIONS = frozenset({"1.16.0"})
# A SACK is sent at once after this many packets carrying DATA (RFC 9260 §6.2).
SACK_EVERY_PACKETS = 2
# Seconds a lone packet's SACK waits for a second packet (RFC 9260 §6.2: at most 200 ms).
SACK_DELAY = 0.05
# The DATA chunk flag asking the receiver to SACK at once (RFC 7053 §3).
SCTP_DATA_SACK_IMMEDIATELY = 0x08

_T: Any = _sctp.RTCSctpTransport
_State: Any = _T.State
_DTLS_CONNECTED: Any = rtcdtlstransport.State.CONNECTED

# The stock methods we replace or wrap, kept to restore them in `uninstall()`.
_PATCHED = (
    "_data_channel_send",
    "_data_channel_flush",
    "_transmit",
    "_receive_sack_chunk",
    "_t3_expired",
    "_handle_data",
)
_REQUIRED = (
    *_PATCHED,
    "_send_sack",
    "_receive_chunk",
    "_transmit_reconfig",
    "_flight_size_increase",
    "_t3_start",
    "_t3_restart",
    "_outbound_queue",
    "_sent_queue",
    "_data_channel_queue",
)
_originals: dict[str, Any] = {}
_installed = False


def supported(version: str | None = None) -> bool:
    """Whether the installed (or the given) aiortc version is one the patch was written for."""
    return (version or aiortc.__version__) in SUPPORTED_VERSIONS


def is_installed() -> bool:
    """Whether the patch is in effect."""
    return _installed


def install() -> bool:
    """Apply the patch once (idempotent); returns whether it is in effect.

    Refuses, with a logged warning, on an aiortc version not in `SUPPORTED_VERSIONS` or when the
    internals it relies on are missing; then aiortc keeps its stock behaviour.
    """
    global _installed
    if _installed:
        return True
    if os.environ.get("ROOMBUS_STOCK_SCTP", "") not in ("", "0"):
        log.info("sctp: ROOMBUS_STOCK_SCTP is set: using aiortc's stock SCTP")
        return False
    if not supported():
        log.warning(
            "sctp: aiortc %s is not one of the versions our SCTP fixes were written for (%s): "
            "using aiortc's stock SCTP (data channels work, but slower)",
            aiortc.__version__,
            ", ".join(sorted(SUPPORTED_VERSIONS)),
        )
        return False
    missing = [name for name in _REQUIRED if not _has_member(name)]
    if missing:
        log.warning("sctp: aiortc lacks %s: using aiortc's stock SCTP", ", ".join(missing))
        return False
    for name in _PATCHED:
        _originals[name] = _T.__dict__[name]
    _T._data_channel_send = _data_channel_send
    _T._data_channel_flush = _data_channel_flush
    _T._transmit = _transmit
    _T._receive_sack_chunk = _wrap_receive_sack(_originals["_receive_sack_chunk"])
    _T._t3_expired = _wrap_t3_expired(_originals["_t3_expired"])
    _T._handle_data = _handle_data
    _installed = True
    log.debug("sctp: patched aiortc %s RTCSctpTransport", aiortc.__version__)
    return True


def uninstall() -> None:
    """Restore aiortc's stock methods (for tests and benchmarks)."""
    global _installed
    for name, method in _originals.items():
        setattr(_T, name, method)
    _originals.clear()
    _installed = False


def _has_member(name: str) -> bool:
    if name in _T.__dict__:
        return True
    # Instance attributes are set in __init__; look for their assignment in its code.
    init = _T.__dict__.get("__init__")
    return init is not None and name in init.__code__.co_names


# ------------------------------------------------------------------ per-instance state
# Class-level defaults: instances shadow them on first write, so __init__ needs no patch.
_T._rb_flush_task = None  # the one scheduled flush task, while pending
_T._rb_rtx_pending = True  # chunks may be marked for retransmission: scan the sent queue
_T._rb_unacked_packets = 0  # packets with DATA received since our last SACK
_T._rb_sack_handle = None  # the pending timer that sends a delayed SACK
_T._rb_sack_task = None  # the task sending a delayed SACK, while it runs
_T._rb_deliveries = None  # the association's DeliveryTracker, once a tracked message was sent


# ------------------------------------------------------------------ send path


def _data_channel_send(self: Any, channel: Any, data: bytes | str) -> None:
    """Queue one message (as aiortc does) and schedule a flush unless one is pending."""
    if data == "":
        pp_id, user_data = _sctp.WEBRTC_STRING_EMPTY, b"\x00"
    elif isinstance(data, str):
        pp_id, user_data = _sctp.WEBRTC_STRING, data.encode("utf8")
    elif data == b"":
        pp_id, user_data = _sctp.WEBRTC_BINARY_EMPTY, b"\x00"
    else:
        pp_id, user_data = _sctp.WEBRTC_BINARY, data
    if self._remote_max_message_size and len(user_data) > self._remote_max_message_size:
        raise ValueError(
            f"Cannot send message of {len(user_data)} bytes, the remote party "
            f"only supports messages up to {self._remote_max_message_size} bytes"
        )
    channel._addBufferedAmount(len(user_data))
    self._data_channel_queue.append((channel, pp_id, user_data))
    _schedule_flush(self)


def _schedule_flush(self: Any) -> None:
    # One flush per loop turn, whatever number of messages the turn queued. It runs as a plain
    # callback: a task per flush (one per message when messages come one per turn) was a
    # visible share of the send path's cost. `_flush_soon` falls back to a task when the
    # flush may have to wait.
    if self._rb_flush_task is None:
        self._rb_flush_task = asyncio.get_running_loop().call_soon(_flush_soon, self)


def _flush_soon(self: Any) -> None:
    self._rb_flush_task = None
    try:
        if _flush_sync(self):
            return
    except Exception as exc:  # noqa: BLE001 - as `_flush_done`: the association died under it
        log.debug("sctp: flush failed: %r", exc)
        return
    # Something to retransmit, a FORWARD-TSN, a stream reset or a send path that may suspend:
    # the stock (async) flush handles them. Messages queued meanwhile get a flush of their own.
    task = asyncio.ensure_future(self._data_channel_flush())
    self._rb_flush_task = task
    task.add_done_callback(functools.partial(_flush_task_done, self))


def _flush_task_done(self: Any, task: asyncio.Future[None]) -> None:
    if self._rb_flush_task is task:
        self._rb_flush_task = None
    _flush_done(task)
    if self._data_channel_queue and self._rb_flush_task is None:
        _schedule_flush(self)


def _flush_done(task: asyncio.Future[None]) -> None:
    # The association may die under a flush (DTLS closed): aiortc's own tasks drop that error
    # too, the connection state change reports it.
    if not task.cancelled() and task.exception() is not None:
        log.debug("sctp: flush failed: %r", task.exception())


def _sync_route(self: Any) -> tuple[Any, Any] | None:
    """(DTLS transport, nominated ICE pair) when a packet can be sent without awaiting.

    The stock path awaits five coroutines (DTLS `_send_data`, `_write_ssl`, aioice's
    `Connection.send`, `sendto`, `StunProtocol.send_data`) none of which ever suspends: the
    datagram goes out with the transport's synchronous `sendto`. That holds for aioice's
    `StunProtocol` (host, server-reflexive and TURN relayed pairs alike); anything else, or a
    connection not (or no longer) established, takes the stock path.
    """
    dtls = self._RTCSctpTransport__transport
    # A transport other than aiortc's (a test's in-memory link), or one whose `_send_data` was
    # replaced on the instance (a test cutting the link), takes the stock path.
    if getattr(dtls, "_state", None) is not _DTLS_CONNECTED or "_send_data" in vars(dtls):
        return None
    connection = getattr(dtls.transport, "_connection", None)
    if connection is None:
        return None
    pair = connection._nominated.get(1)
    if pair is None or type(pair.protocol) is not _StunProtocol:
        return None
    return dtls, pair


def _send_packet_sync(route: tuple[Any, Any], packet: bytes) -> None:
    """Encrypt one SCTP packet and send its DTLS record (what `_send_data` does, without awaits)."""
    dtls, pair = route
    ssl = dtls._ssl
    ssl.send(packet)
    try:
        record = ssl.bio_read(1500)
    except SSL.Error:
        return
    if record:
        pair.protocol.transport.sendto(record, pair.remote_addr)
        dtls._RTCDtlsTransport__tx_bytes += len(record)
        dtls._RTCDtlsTransport__tx_packets += 1


def _flush_sync(self: Any) -> bool:
    """`_data_channel_flush` without awaiting, where possible; False: use the async one.

    Only new data goes this way: retransmissions, a pending FORWARD-TSN or stream reset, and a
    send path that may suspend leave it to the stock code.
    """
    if self._association_state != _State.ESTABLISHED:
        return True  # as the async flush: nothing to do until established
    if not self._data_channel_queue and not self._reconfig_queue:
        return True  # the common case after a SACK: nothing waits to be moved
    if self._rb_rtx_pending or self._forward_tsn_chunk is not None or self._reconfig_queue:
        return False
    route = _sync_route(self)
    if route is None:
        return False
    if _move_queued(self):
        _transmit_new(self, lambda packet: _send_packet_sync(route, packet))
    return True


def _flush_budget(self: Any) -> int:
    """Bytes of user data worth handing to SCTP now.

    That is what `_transmit` may send on this call (the free window, at most one burst) plus
    one chunk's worth, so that the outbound queue stays short (it is scanned in O(n)) and the
    rest stays in the data channel queue, counted in `bufferedAmount` for flow control.
    """
    burst: int = 4 * _sctp.USERDATA_MAX_LENGTH
    free: int = _send_window(self) - self._flight_size
    return max(min(free, burst), 0) + burst // 4


def _send_window(self: Any) -> int:
    """Bytes that may be in flight: the congestion window, capped by the peer's receive window.

    A closed window still admits one chunk when nothing is in flight (the zero window probe).
    """
    window: int = self._cwnd
    peer: int | None = getattr(self, "_rb_peer_rwnd", None)
    if peer is not None:
        window = min(window, max(peer, 1 if self._flight_size == 0 else 0))
    return window


async def _data_channel_flush(self: Any) -> None:
    """Hand queued messages to SCTP, as many as the congestion window can take, then transmit.

    Stock aiortc moves a message only when SCTP's outbound queue is empty, one at a time, and
    transmits each on its own; moving a window's worth first lets `_transmit` bundle them.
    """
    if _flush_sync(self):
        return
    if self._association_state != _State.ESTABLISHED:
        return
    moved = _move_queued(self)
    if moved:
        await self._transmit()
    # A stream reset may have been waiting for these messages.
    await self._transmit_reconfig()


def _move_queued(self: Any) -> bool:
    """Move data channel messages onto SCTP's outbound queue, within `_flush_budget`."""
    queue = self._data_channel_queue
    outbound_bytes = sum(len(chunk.user_data) for chunk in self._outbound_queue)
    budget = _flush_budget(self)
    moved = False
    while queue and outbound_bytes < budget:
        channel, protocol, user_data = queue.popleft()
        stream_id = channel.id
        if stream_id is None:
            # Register the channel (an even or odd id by DTLS role, as aiortc does).
            stream_id = self._data_channel_id
            while stream_id in self._data_channels:
                stream_id += 2
            self._data_channels[stream_id] = channel
            channel._setId(stream_id)
        if protocol == _sctp.WEBRTC_DCEP:
            _enqueue(self, stream_id, protocol, user_data, None, None, True)
        else:
            expiry = None
            if channel.maxPacketLifeTime:
                expiry = time.time() + (channel.maxPacketLifeTime / 1000)
            _enqueue(
                self,
                stream_id,
                protocol,
                user_data,
                expiry,
                channel.maxRetransmits,
                channel.ordered,
            )
            channel._addBufferedAmount(-len(user_data))
        outbound_bytes += len(user_data)
        moved = True
    return moved


def _enqueue(
    self: Any,
    stream_id: int,
    pp_id: int,
    user_data: bytes,
    expiry: float | None,
    max_retransmits: int | None,
    ordered: bool,
) -> None:
    """Fragment one message into DATA chunks on the outbound queue.

    This is aiortc's `_send` without its `_transmit` call: the flush transmits once for all the
    messages it moved.
    """
    limit = _sctp.USERDATA_MAX_LENGTH
    stream_seq = self._outbound_stream_seq.get(stream_id, 0) if ordered else 0
    fragments = math.ceil(len(user_data) / limit)
    pos = 0
    for fragment in range(fragments):
        chunk = _sctp.DataChunk()
        chunk.flags = 0 if ordered else _sctp.SCTP_DATA_UNORDERED
        if fragment == 0:
            chunk.flags |= _sctp.SCTP_DATA_FIRST_FRAG
        if fragment == fragments - 1:
            chunk.flags |= _sctp.SCTP_DATA_LAST_FRAG
        chunk.tsn = self._local_tsn
        chunk.stream_id = stream_id
        chunk.stream_seq = stream_seq
        chunk.protocol = pp_id
        chunk.user_data = user_data[pos : pos + limit]
        chunk._abandoned = False
        chunk._acked = False
        chunk._book_size = len(chunk.user_data)
        chunk._expiry = expiry
        chunk._in_flight = False
        chunk._max_retransmits = max_retransmits
        chunk._misses = 0
        chunk._retransmit = False
        chunk._sent_count = 0
        chunk._sent_time = None
        pos += limit
        self._local_tsn = _sctp.tsn_plus_one(self._local_tsn)
        self._outbound_queue.append(chunk)
    if ordered:
        self._outbound_stream_seq[stream_id] = _uint16_add(stream_seq, 1)
    if type(user_data) is TrackedBytes:
        user_data.delivery.tsn = _sctp.tsn_minus_one(self._local_tsn)


def _packet(self: Any, chunks: list[bytes]) -> bytes:
    """Serialized chunks as one SCTP packet (common header and CRC32c as aiortc does)."""
    header = pack("!HHL", self._local_port, self._remote_port, self._remote_verification_tag)
    body = b"".join(chunks)
    checksum = _sctp.crc32c(header + b"\x00\x00\x00\x00" + body)
    return header + pack("<L", checksum) + body


def _burst_window(self: Any) -> int:
    """What may be in flight after this transmit: aiortc's burst limit within the cwnd."""
    if self._fast_recovery_exit is not None:
        burst_size = 2 * _sctp.USERDATA_MAX_LENGTH
    else:
        burst_size = 4 * _sctp.USERDATA_MAX_LENGTH
    return min(self._flight_size + burst_size, self._cwnd)  # type: ignore[no-any-return]


async def _transmit(self: Any) -> None:
    """Aiortc's `_transmit`, bundling new DATA chunks; retransmissions scanned only if needed.

    The scan is skipped unless a SACK with gap blocks or the T3 timer may have marked chunks.
    """
    if self._forward_tsn_chunk is not None:
        await self._send_chunk(self._forward_tsn_chunk)
        self._forward_tsn_chunk = None
        if not self._t3_handle:
            self._t3_start()

    cwnd = _burst_window(self)
    if self._rb_rtx_pending:
        # Retransmissions, exactly as aiortc (one chunk per packet; they are rare).
        retransmit_earliest = True
        for chunk in self._sent_queue:
            if chunk._retransmit:
                if self._fast_recovery_transmit:
                    self._fast_recovery_transmit = False
                elif self._flight_size >= cwnd:
                    return  # still pending: scan again next time
                self._flight_size_increase(chunk)
                chunk._misses = 0
                chunk._retransmit = False
                chunk._sent_count += 1
                await self._send_chunk(chunk)
                if retransmit_earliest:
                    self._t3_restart()
            retransmit_earliest = False
        self._rb_rtx_pending = False

    packets = _new_packets(self, cwnd)
    if not packets:
        return
    route = _sync_route(self)
    if route is not None:
        for packet in packets:
            _send_packet_sync(route, packet)
        return
    dtls = self._RTCSctpTransport__transport
    for packet in packets:
        await dtls._send_data(packet)


def _transmit_new(self: Any, send: Callable[[bytes], None]) -> None:
    """`_transmit` when nothing waits for retransmission: new data only, sent by `send`."""
    for packet in _new_packets(self, _burst_window(self)):
        send(packet)


def _new_packets(self: Any, cwnd: int) -> list[bytes]:
    """Take new DATA chunks off the outbound queue, within `cwnd`, bundled into packets.

    New data also respects the peer's receive window (retransmissions do not need to: they
    replace data the peer counted already).
    """
    outbound = self._outbound_queue
    cwnd = min(cwnd, _send_window(self))
    if not outbound or self._flight_size >= cwnd:
        return []
    limit = _sctp.SCTP_MAX_PACKET_LENGTH - _sctp.SCTP_COMMON_HEADER_LENGTH
    packets: list[bytes] = []
    bundle: list[bytes] = []
    size = 0
    now = time.time()
    tracker: DeliveryTracker | None = self._rb_deliveries
    waiting = tracker is not None and len(tracker) > 0
    while outbound and self._flight_size < cwnd:
        chunk = outbound.popleft()
        self._sent_queue.append(chunk)
        self._flight_size_increase(chunk)
        chunk._sent_count += 1
        chunk._sent_time = now
        if waiting and (not outbound or self._flight_size >= cwnd):
            # The last chunk before we go quiet: someone waits for its SACK, so ask for it now
            # rather than after the peer's delayed-ack timer.
            chunk.flags |= SCTP_DATA_SACK_IMMEDIATELY
        data = bytes(chunk)
        if bundle and size + len(data) > limit:
            packets.append(_packet(self, bundle))
            bundle, size = [], 0
        bundle.append(data)
        size += len(data)
        if not self._t3_handle:
            self._t3_start()
    if bundle:
        packets.append(_packet(self, bundle))
    return packets


def _wrap_receive_sack(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def _receive_sack_chunk(self: Any, chunk: Any) -> None:
        self._rb_peer_rwnd = chunk.advertised_rwnd
        if chunk.gaps:
            # Gap blocks may strike chunks for fast retransmission.
            self._rb_rtx_pending = True
        await original(self, chunk)

    return _receive_sack_chunk


def _wrap_t3_expired(original: Callable[[Any], None]) -> Callable[[Any], None]:
    def _t3_expired(self: Any) -> None:
        self._rb_rtx_pending = True  # T3 marks every outstanding chunk
        original(self)

    return _t3_expired


# ------------------------------------------------------------------ receive path


async def _handle_data(self: Any, data: bytes) -> None:
    """Aiortc's `_handle_data` with SACKs for every second DATA packet, or once idle."""
    try:
        _, _, verification_tag, chunks = _sctp.parse_packet(data)
    except ValueError:
        return
    if any(isinstance(chunk, _sctp.InitChunk) for chunk in chunks):
        if len(chunks) != 1:
            return  # RFC 9260 §6.10: an INIT is never bundled
        expected_tag = 0
    else:
        expected_tag = self._local_verification_tag
    if verification_tag != expected_tag:
        return
    for chunk in chunks:
        await self._receive_chunk(chunk)
    if not self._sack_needed:
        return
    self._rb_unacked_packets += 1
    if (
        self._rb_unacked_packets >= SACK_EVERY_PACKETS
        or self._sack_misordered
        or self._sack_duplicates
        or self._association_state != _State.ESTABLISHED
    ):
        await _sack_now(self)
    elif self._rb_sack_handle is None:
        # The SACK goes out with the next packet's, or after SACK_DELAY.
        self._rb_sack_handle = asyncio.get_running_loop().call_later(
            SACK_DELAY, _delayed_sack, self
        )


async def _sack_now(self: Any) -> None:
    handle, self._rb_sack_handle = self._rb_sack_handle, None
    if handle is not None:
        handle.cancel()
    self._rb_unacked_packets = 0
    if not _send_sack_sync(self):
        await self._send_sack()


def _send_sack_sync(self: Any) -> bool:
    """Aiortc's `_send_sack` down the synchronous route (`_sync_route`); False: none."""
    route = _sync_route(self)
    if route is None:
        return False
    gaps: list[list[int]] = []
    gap_next = None
    for tsn in sorted(self._sack_misordered):
        pos = (tsn - self._last_received_tsn) % _TSN_MODULO
        if tsn == gap_next:
            gaps[-1][1] = pos
        else:
            gaps.append([pos, pos])
        gap_next = _sctp.tsn_plus_one(tsn)
    sack = _sctp.SackChunk()
    sack.cumulative_tsn = self._last_received_tsn
    sack.advertised_rwnd = max(0, self._advertised_rwnd)
    sack.duplicates = self._sack_duplicates[:]
    sack.gaps = [(a, b) for a, b in gaps]
    _send_packet_sync(route, _packet(self, [bytes(sack)]))
    self._sack_duplicates.clear()
    self._sack_needed = False
    return True


def _delayed_sack(self: Any) -> None:
    self._rb_sack_handle = None
    if not self._sack_needed:
        return
    if self._rb_sack_task is not None:
        return  # one is on its way
    if self._association_state == _State.ESTABLISHED:
        try:
            if _send_sack_sync(self):
                self._rb_unacked_packets = 0
                return
        except Exception as exc:  # noqa: BLE001 - as `_flush_done`: the association died
            log.debug("sctp: SACK failed: %r", exc)
            return
    task = asyncio.ensure_future(_send_delayed_sack(self))
    self._rb_sack_task = task
    task.add_done_callback(_flush_done)


async def _send_delayed_sack(self: Any) -> None:
    self._rb_sack_task = None
    if self._sack_needed and self._association_state == _State.ESTABLISHED:
        self._rb_unacked_packets = 0
        await self._send_sack()


# ------------------------------------------------------------------ delivery tracking

# The stock methods the delivery hooks wrap (none of them is replaced by `install()`).
_DELIVERY_PATCHED = ("_send", "_update_advanced_peer_ack_point", "_set_state")
_DELIVERY_REQUIRED = (*_DELIVERY_PATCHED, "_local_tsn", "_last_sacked_tsn", "_data_channel_queue")
_delivery_originals: dict[str, Any] = {}
_delivery_installed = False
_delivery_refused = False  # install_delivery_tracking() refused (and warned) once
_TSN_MODULO = 2**32


class TrackedBytes(bytes):
    """A message whose `Delivery` is awaited; aiortc passes the object on to chunking unchanged.

    Only its identity matters to SCTP: chunks are slices (plain bytes) of it.
    """

    delivery: Delivery


def tracked(data: bytes, delivery: Delivery) -> TrackedBytes:
    """`data` marked so that SCTP tells `delivery` its TSN (empty data cannot be tracked)."""
    if not data:
        # aiortc sends b"" as a fresh b"\x00" placeholder, losing the mark.
        raise ValueError("sctp: an empty message cannot be tracked")
    marked = TrackedBytes(data)
    marked.delivery = delivery
    return marked


def deliveries(transport: Any) -> DeliveryTracker:
    """The `DeliveryTracker` of an `RTCSctpTransport` (created on first use)."""
    tracker: DeliveryTracker | None = transport._rb_deliveries
    if tracker is None:
        tracker = DeliveryTracker()
        if transport._association_state == _State.CLOSED and transport.state == "closed":
            tracker.fail_all(connection_lost("SCTP association closed"), final=True)
        transport._rb_deliveries = tracker
    return tracker


def delivery_tracking() -> bool:
    """Whether delivery tracking is in effect."""
    return _delivery_installed


def install_delivery_tracking() -> bool:
    """Install the delivery hooks once (idempotent); returns whether they are in effect.

    Not affected by `ROOMBUS_STOCK_SCTP` (they only observe). Refuses, with a logged warning,
    on an aiortc version not in `SUPPORTED_VERSIONS` or without the internals it relies on.
    """
    global _delivery_installed, _delivery_refused
    if _delivery_installed:
        return True
    if _delivery_refused:
        return False  # said so once already
    _delivery_refused = True
    if not supported():
        log.warning(
            "sctp: aiortc %s is not one of the versions delivery tracking was written for (%s): "
            "a message counts as delivered once handed to the local SCTP queue, so a crash may "
            "lose acknowledged messages",
            aiortc.__version__,
            ", ".join(sorted(SUPPORTED_VERSIONS)),
        )
        return False
    missing = [name for name in _DELIVERY_REQUIRED if not _has_member(name)]
    if missing:
        log.warning("sctp: aiortc lacks %s: no delivery tracking", ", ".join(missing))
        return False
    for name in _DELIVERY_PATCHED:
        _delivery_originals[name] = _T.__dict__[name]
    _T._send = _wrap_send(_delivery_originals["_send"])
    _T._update_advanced_peer_ack_point = _wrap_ack_point(
        _delivery_originals["_update_advanced_peer_ack_point"]
    )
    _T._set_state = _wrap_set_state(_delivery_originals["_set_state"])
    _delivery_installed = True
    _delivery_refused = False
    return True


def uninstall_delivery_tracking() -> None:
    """Remove the delivery hooks (for tests); a later install checks (and warns) again."""
    global _delivery_installed, _delivery_refused
    _delivery_refused = False
    for name, method in _delivery_originals.items():
        setattr(_T, name, method)
    _delivery_originals.clear()
    _delivery_installed = False


def _wrap_send(original: Callable[..., Any]) -> Callable[..., Any]:
    async def _send(
        self: Any,
        stream_id: int,
        pp_id: int,
        user_data: bytes,
        expiry: float | None = None,
        max_retransmits: int | None = None,
        ordered: bool = True,
    ) -> None:
        # Stock aiortc's chunking (our `_enqueue` records the TSN itself). The TSNs are those
        # `_send` assigns before its first await: `_local_tsn` onwards, one per fragment.
        if type(user_data) is TrackedBytes:
            fragments = math.ceil(len(user_data) / _sctp.USERDATA_MAX_LENGTH)
            user_data.delivery.tsn = (self._local_tsn + fragments - 1) % _TSN_MODULO
        await original(self, stream_id, pp_id, user_data, expiry, max_retransmits, ordered)

    return _send


def _wrap_ack_point(original: Callable[[Any], None]) -> Callable[[Any], None]:
    def _update_advanced_peer_ack_point(self: Any) -> None:
        # Called after every SACK that moved (or kept) the cumulative ack, and on T3 expiry.
        tracker: DeliveryTracker | None = self._rb_deliveries
        if tracker is not None and len(tracker):
            tracker.acknowledge(self._last_sacked_tsn)
        original(self)

    return _update_advanced_peer_ack_point


def _wrap_set_state(original: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def _set_state(self: Any, state: Any) -> None:
        original(self, state)
        if state == _State.CLOSED:
            tracker: DeliveryTracker | None = self._rb_deliveries
            if tracker is not None:
                tracker.fail_all(connection_lost("SCTP association closed"), final=True)

    return _set_state
