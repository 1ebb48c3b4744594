"""Received SCTP packets decrypted and handled in the datagram callback, not through two queues.

Why: in stock aiortc every datagram of a peer connection takes this route: aioice's
`StunProtocol.datagram_received` first tries to parse it as STUN (which raises for anything
else), then puts it on the ICE connection's `asyncio.Queue`; the DTLS transport's reader task
wakes up, awaits the queue through two `recv` coroutines, decrypts the record, awaits its own
`_write_ssl`, and awaits SCTP's `_handle_data`. On the bus-to-room path every message costs at
least one such datagram (the server's SACK), so that route was a large share of the bridge's
receive cost: a queue put and get, a task wake-up and a chain of coroutines per packet.

Here, once a connection's DTLS handshake is done, an application-data record (the only kind
SCTP travels in) is decrypted in the datagram callback itself and SCTP handles the packet at
once. SCTP's `_handle_data` is a coroutine, but on the paths that matter it never suspends
(SACKs, DATA and the sends they cause go down the synchronous route of `bridge.room.sctp`), so
it is run to completion in place; if it does suspend, the rest runs as a task and later
datagrams wait behind it, in order. Nothing else changes: STUN (consent checks, keepalives),
handshake and alert records, and any datagram that arrives while the stock reader still has
work queued take the stock route, so per-connection order is kept.

Stock behaviour is kept on an aiortc or aioice version this was not written for
(`SUPPORTED`), and with ``ROOMBUS_STOCK_SCTP=1`` (like `bridge.room.sctp`). Remove this module
once aiortc reads datagrams without the queue upstream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Coroutine, Generator
from typing import Any

import aioice
import aioice.ice
import aiortc
from aiortc import rtcdtlstransport
from OpenSSL import SSL

log = logging.getLogger("roombus.room")

# (aiortc, aioice) versions whose internals this relies on.
SUPPORTED = frozenset({("1.16.0", "0.13.0")})
# TLS record content type of application data (RFC 6347 §4.1): SCTP packets.
_APPLICATION_DATA = 23

_Dtls: Any = rtcdtlstransport.RTCDtlsTransport
_Connection: Any = aioice.ice.Connection
_Stun: Any = aioice.ice.StunProtocol
_CONNECTED: Any = rtcdtlstransport.State.CONNECTED
_originals: dict[str, Any] = {}
_installed = False


def supported() -> bool:
    """Whether the installed aiortc and aioice are versions this was written for."""
    return (aiortc.__version__, aioice.__version__) in SUPPORTED


def is_installed() -> bool:
    """Whether the direct route is in effect."""
    return _installed


def install() -> bool:
    """Install the direct route for every connection made from now on (idempotent)."""
    global _installed
    if _installed:
        return True
    if os.environ.get("ROOMBUS_STOCK_SCTP", "") not in ("", "0"):
        return False
    if not supported():
        log.info(
            "room: aiortc %s / aioice %s: received packets take aiortc's stock route",
            aiortc.__version__,
            aioice.__version__,
        )
        return False
    _originals["datagram_received"] = _Stun.__dict__["datagram_received"]
    _originals["data_received"] = _Connection.__dict__["data_received"]
    _originals["_register_data_receiver"] = _Dtls.__dict__["_register_data_receiver"]
    _Stun.datagram_received = _datagram_received
    _Connection.data_received = _data_received
    _Dtls._register_data_receiver = _register_data_receiver
    _installed = True
    return True


def uninstall() -> None:
    """Restore the stock methods (for tests and benchmarks); existing connections keep theirs."""
    global _installed
    _Stun.datagram_received = _originals.pop("datagram_received", _Stun.datagram_received)
    _Connection.data_received = _originals.pop("data_received", _Connection.data_received)
    _Dtls._register_data_receiver = _originals.pop(
        "_register_data_receiver", _Dtls._register_data_receiver
    )
    _installed = False


# Class-level default: a connection without a DTLS transport yet takes the stock route.
_Connection._rb_direct = None


def _datagram_received(self: Any, data: bytes, addr: tuple[Any, ...]) -> None:
    """The STUN protocol's `datagram_received`, without parsing DTLS records as STUN first.

    RFC 7983 §7: a first byte in 20..63 is DTLS, never STUN (whose first byte is 0 or 1).
    """
    if data and 19 < data[0] < 64:
        self.receiver.data_received(data, self.local_candidate.component)
        return
    _originals["datagram_received"](self, data, addr)


def _data_received(self: Any, data: bytes, component: int) -> None:
    direct: _Direct | None = self._rb_direct
    if direct is None or not direct.take(data):
        self._queue.put_nowait((data, component))  # the stock route (aioice's own body)


def _register_data_receiver(self: Any, receiver: Any) -> None:
    _originals["_register_data_receiver"](self, receiver)
    connection = getattr(self.transport, "_connection", None)
    if isinstance(connection, _Connection):
        connection._rb_direct = _Direct(self, connection)


class _Direct:
    """The direct route of one ICE connection to its DTLS transport and SCTP association."""

    __slots__ = ("backlog", "busy", "connection", "dtls", "handled", "resumed")

    def __init__(self, dtls: Any, connection: Any) -> None:
        self.dtls = dtls
        self.connection = connection
        # While a packet's handling is suspended (`busy`), later records wait here, in order.
        self.backlog: collections.deque[bytes] = collections.deque()
        self.busy: asyncio.Future[None] | None = None
        self.handled = 0  # records taken on the direct route
        self.resumed = 0  # of which the handling suspended and finished as a task

    def take(self, data: bytes) -> bool:
        """Handle `data` here; False: it takes the stock route."""
        dtls = self.dtls
        if (
            data[0] != _APPLICATION_DATA
            or dtls._state is not _CONNECTED
            or not dtls._RTCDtlsTransport__handshake_done
        ):
            return False
        queue = self.connection._queue
        # The stock reader must be parked on an empty queue: otherwise it still has datagrams
        # to handle, and this one must come after them.
        if queue._queue or not queue._getters:
            return False
        self.handled += 1
        if self.busy is not None:
            self.backlog.append(data)
        else:
            self._receive(data)
        return True

    def _receive(self, data: bytes) -> None:
        dtls = self.dtls
        if dtls._state is not _CONNECTED:
            return  # closed meanwhile: the stock reader would not read it either
        ssl = dtls._ssl
        ssl.bio_write(data)
        try:
            packet = ssl.recv(1500)
        except SSL.ZeroReturnError:
            self._lost()  # the peer shut DTLS down: as the stock reader, end the transport
            return
        except SSL.Error:
            packet = b""
        dtls._RTCDtlsTransport__rx_bytes += len(data)
        dtls._RTCDtlsTransport__rx_packets += 1
        try:
            reply = ssl.bio_read(1500)  # what DTLS itself answers, if anything (rare here)
        except SSL.Error:
            reply = b""
        if reply:
            _spawn(dtls.transport._send(reply))
        receiver = dtls._data_receiver
        if packet and receiver is not None:
            self._run(receiver._handle_data(packet))

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` to completion now; if it suspends, finish it as a task (`busy`)."""
        try:
            awaited = coro.send(None)
        except StopIteration:
            return
        except ConnectionError:
            self._lost()
            return
        except Exception:
            # As the stock reader: an error handling a packet ends the transport.
            log.warning("room: handling a received SCTP packet failed", exc_info=True)
            self._lost()
            return
        self.resumed += 1
        self.busy = asyncio.ensure_future(_finish(coro, awaited))
        self.busy.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self.busy = None
        if not task.cancelled():
            error = task.exception()
            if error is not None:
                if not isinstance(error, ConnectionError):
                    log.warning("room: handling a received SCTP packet failed", exc_info=error)
                self._lost()
                return
        while self.backlog and self.busy is None:
            self._receive(self.backlog.popleft())

    def _lost(self) -> None:
        """End the DTLS transport as its stock reader does on a failure (it reads None)."""
        self.backlog.clear()
        self.connection._queue.put_nowait(None)


class _Resume:
    """Yields to the running task what a coroutine we started awaited (see `_finish`)."""

    __slots__ = ("awaited",)

    def __init__(self, awaited: Any) -> None:
        self.awaited = awaited

    def __await__(self) -> Generator[Any, None, None]:
        yield self.awaited


async def _finish(coro: Coroutine[Any, Any, None], awaited: Any) -> None:
    """Drive `coro`, which suspended on `awaited` outside any task, to its end inside this one.

    The task waits on whatever `coro` yields (a future, or None for a bare yield), exactly as
    if it had been running `coro` itself, and passes a cancellation on to it.
    """
    while True:
        try:
            await _Resume(awaited)
        except BaseException as exc:  # noqa: BLE001 - a cancellation, passed on to `coro`
            try:
                awaited = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            awaited = coro.send(None)
        except StopIteration:
            return


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_ignore_result)


def _ignore_result(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("room: DTLS reply failed: %r", task.exception())
