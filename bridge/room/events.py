"""Room events and their delivery: handlers (`Room.on`) and async iterators (`Room.events`).

Events are delivered in order by one dispatcher task. A handler that is a coroutine function is
awaited before the next event, and a subscription's bounded queue makes the dispatcher wait when
it is full: a slow consumer slows the room's event delivery instead of growing memory. Protocol
traffic (RPC, streams) does not go through here, so a handler may itself call `perform_rpc`.

State events (participants, attributes, metadata) are defined in `bridge.room.state`; this module
adds the connection's own and `DataReceived`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from bridge.room.types import DataPacket

log = logging.getLogger("roombus.room.events")

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class DataReceived:
    """A user data packet arrived."""

    packet: DataPacket


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The session was lost and is being rejoined; sends fail until `Reconnected`."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A new session is up; state events before this one re-synced what changed meanwhile."""

    attempts: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The room is closed for good: by us, by the server, or after reconnecting failed.

    `server_reason` is the `models.DisconnectReason` of the server's `leave` when the server
    closed the session (ROOM_DELETED, ROOM_CLOSED, PARTICIPANT_REMOVED ...), else None.
    """

    reason: str
    error: Exception | None = None
    server_reason: int | None = None


class Subscription:
    """An async iterator over the room's events of some types, with a bounded queue."""

    def __init__(self, hub: EventHub, types: tuple[type[Any], ...], maxsize: int) -> None:
        self._hub = hub
        self.types = types
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self.closed and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is _END:
            raise StopAsyncIteration
        return item

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving events (buffered ones can still be read)."""
        self._hub.remove(self)
        self.closed = True


_END = object()


class EventHub:
    """Fan-out of events to handlers and subscriptions, in order."""

    def __init__(self) -> None:
        self._handlers: list[tuple[type[Any], Callable[[Any], Awaitable[None] | None]]] = []
        self._subs: list[Subscription] = []

    def on(
        self, event_type: type[E], handler: Callable[[E], Awaitable[None] | None]
    ) -> Callable[[], None]:
        """Call `handler` for every event of `event_type`; returns a function that unsubscribes."""
        entry = (event_type, handler)
        self._handlers.append(entry)

        def off() -> None:
            if entry in self._handlers:
                self._handlers.remove(entry)

        return off

    def subscribe(self, types: tuple[type[Any], ...], maxsize: int) -> Subscription:
        """A new subscription to events of `types` (all events when empty)."""
        sub = Subscription(self, types, maxsize)
        self._subs.append(sub)
        return sub

    def remove(self, sub: Subscription) -> None:
        """Detach a subscription."""
        if sub in self._subs:
            self._subs.remove(sub)

    async def publish(self, event: object) -> None:
        """Deliver one event to every matching handler and subscription."""
        for event_type, handler in list(self._handlers):
            if not isinstance(event, event_type):
                continue
            try:
                result = handler(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("events: handler %r failed on %s", handler, type(event).__name__)
        for sub in list(self._subs):
            if not sub.types or isinstance(event, sub.types):
                await sub.queue.put(event)

    def close(self) -> None:
        """End every subscription's iteration (after the events already queued)."""
        for sub in list(self._subs):
            sub.closed = True
            # A full queue needs no marker: the reader stops once it drained it (closed is set).
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(_END)
        self._subs.clear()
