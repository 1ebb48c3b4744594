"""Knowing when livekit-server has a message: `Delivery` and the per-association bookkeeping.

A reliable message handed to a data channel is only queued locally (aiortc's data channel
queue, then SCTP's outbound queue). It is safe on the server once the server's SCTP stack
acknowledges it: the *cumulative TSN ack* of a SACK covers the TSN of the message's last DATA
chunk (RFC 9260 §3.3.4). A `Delivery` is the awaitable for that moment; a `DeliveryTracker`
(one per SCTP association, see `bridge.room.sctp`) resolves them.

Bookkeeping is O(1) amortized per message: every SCTP association assigns TSNs in the order
messages leave its data channel queue, which is the order they were handed to it, so the
tracker keeps its deliveries in one deque in send order. A delivery learns its TSN when the
message is cut into chunks; each SACK pops and resolves the deliveries at the head whose TSN
it covers (serial-number comparison, so TSN wrap-around is fine). When the association or the
room's session goes away, every pending delivery fails with `NotConnectedError`, which is
retriable: the caller sends again after the rejoin (so a message may then arrive twice:
delivery is at least once).

This module has no aiortc dependency; `bridge.room.sctp` connects it to aiortc.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Generator
from typing import Any

from bridge.room.errors import NotConnectedError

_HALF = 0x80000000


def tsn_gte(a: int, b: int) -> bool:
    """`a >= b` in 32-bit serial-number arithmetic (RFC 1982), as aiortc's `uint32_gte`."""
    return a == b or (a < b and b - a > _HALF) or (a > b and a - b < _HALF)


class Delivery:
    """Resolves once livekit-server has acknowledged one sent message.

    Await it (``await delivery``): it returns None when the peer's cumulative acknowledgement
    covers the message, and raises `NotConnectedError` (retriable) when the connection was lost
    first. Awaiting it again gives the same outcome; a caller that stops waiting (cancellation,
    a timeout) does not affect the message.
    """

    __slots__ = ("_future", "tsn")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The TSN of the message's last DATA chunk, once SCTP has assigned it.
        self.tsn: int | None = None

    @classmethod
    def resolved(cls) -> Delivery:
        """A delivery that is already done (for sends that are not tracked, e.g. lossy ones)."""
        delivery = cls()
        delivery._future.set_result(None)
        return delivery

    def done(self) -> bool:
        """Whether the outcome is known (acknowledged, or failed)."""
        return self._future.done()

    def failed(self) -> BaseException | None:
        """The error if the delivery failed; None while pending or once acknowledged."""
        if not self._future.done():
            return None
        return self._future.exception()

    def add_done_callback(self, callback: Any) -> None:
        """Call `callback(future)` once the outcome is known (see `asyncio.Future`)."""
        self._future.add_done_callback(callback)

    def __await__(self) -> Generator[Any, None, None]:
        # Shielded: a waiter that gives up must not cancel the shared outcome.
        return asyncio.shield(self._future).__await__()

    def _resolve(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(error)
            # Nobody may be waiting any more (the caller gave up): no "never retrieved" noise.
            self._future.exception()

    def __repr__(self) -> str:
        if not self._future.done():
            state = "pending"
        else:
            state = "failed" if self._future.exception() is not None else "delivered"
        return f"Delivery(tsn={self.tsn}, {state})"


class DeliveryTracker:
    """The deliveries of one SCTP association, in send order (which is TSN order)."""

    __slots__ = ("_closed", "_pending")

    def __init__(self) -> None:
        self._pending: deque[Delivery] = deque()
        self._closed: BaseException | None = None

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def closed(self) -> bool:
        """Whether the association is gone (new deliveries fail at once)."""
        return self._closed is not None

    def add(self, delivery: Delivery) -> None:
        """Track `delivery`, for a message just handed to the association's data channel queue.

        Must be called in the order messages are handed over (the order TSNs are assigned).
        """
        if self._closed is not None:
            delivery._fail(self._closed)
            return
        self._pending.append(delivery)

    def acknowledge(self, cumulative_tsn: int) -> int:
        """The peer acknowledged every TSN up to `cumulative_tsn`: resolve what that covers.

        Returns how many deliveries were resolved. Stops at the first delivery not covered or
        still without a TSN (its message has not been cut into chunks yet; nor have later ones).
        """
        pending = self._pending
        resolved = 0
        while pending:
            head = pending[0]
            tsn = head.tsn
            if tsn is None or not tsn_gte(cumulative_tsn, tsn):
                break
            pending.popleft()
            head._resolve()
            resolved += 1
        return resolved

    def fail_all(self, error: BaseException, *, final: bool = False) -> int:
        """Fail every pending delivery with `error`; with `final`, also every later one.

        Returns how many failed.
        """
        if final and self._closed is None:
            self._closed = error
        failed = 0
        while self._pending:
            self._pending.popleft()._fail(error)
            failed += 1
        return failed


def connection_lost(reason: str) -> NotConnectedError:
    """The error pending deliveries fail with when the connection goes away."""
    return NotConnectedError(f"room: not delivered, the connection was lost ({reason})")


__all__ = ["Delivery", "DeliveryTracker", "connection_lost", "tsn_gte"]
