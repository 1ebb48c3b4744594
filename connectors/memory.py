"""An in-memory bus: the test double of the broker endpoints, behind the same seam.

A `MemoryBroker` is the far side, shared by any number of `MemoryBus` endpoints the way clients
share a real broker. A `MemoryBus` is a `Source[Envelope]` and a `Sink[Outbound]`
(`bridge/endpoint.py`): ``publish`` hands an `Outbound` to the broker, which delivers it as an
`Envelope` to every open bus subscribed to a matching MQTT-style filter (``+``, ``#``). It keeps
the promises of the seam that the runtime relies on, so the runtime can be tested without
servers (in the spirit of httpx's ``MockTransport`` and aiortc's paired in-process fakes):

* Bounded: a subscriber holds at most ``inbox_size`` messages it has not settled (unread, or
  read and not acknowledged, like MQTT 5's Receive Maximum or Kafka's in-flight window); a
  publish to a full inbox waits — backpressure.
* Every inbound has an ``ack`` that records its outcome (`acked`, `nacked` with the
  `RejectedMessage`); its ordering key is the topic.
* A persistent session: what was read but never settled is delivered again, in its original
  order, after `reconnect()` (or ``set_connected(False)`` then ``True``); settled messages never.
* Failure injection: `fail_publish`, `set_connected`, and ``publish_delay`` (the PUBACK's latency).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from bridge.endpoint import Ack, Inbound
from bridge.envelope import Envelope, Outbound
from bridge.errors import ConnectorError, RejectedMessage
from bridge.topics import TopicFilter, parse_filter


class MemoryBroker:
    """Topics shared by `MemoryBus` endpoints.

    Attributes:
        published: Every message any bus published through this broker, in order.
    """

    def __init__(self) -> None:
        self.published: list[Outbound] = []
        self._buses: list[MemoryBus] = []

    async def _route(self, message: Outbound) -> None:
        self.published.append(message)
        for bus in list(self._buses):
            if bus.matches(message.topic):
                await bus._offer(message)  # waits while that subscriber's inbox is full


@dataclass(frozen=True, slots=True)
class MemoryInbound(Inbound[Envelope]):
    """An `Inbound` of a `MemoryBus`; ``redelivered`` is True from the second delivery on."""

    redelivered: bool = False


@dataclass(eq=False)
class _Held:
    seq: int  # arrival order at this subscriber
    envelope: Envelope
    deliveries: int = 0
    settled: bool = False


class MemoryBus:
    """One in-memory endpoint: publishes to its broker, receives what matches its filters.

    Attributes:
        name: The endpoint name, the ``source`` of every envelope it receives.
        broker: The shared far side.
        inbox_size: At most this many messages are held unsettled here (see the module).
        publish_delay: Seconds ``publish`` waits after delivering, like a PUBACK's round trip.
        published: What this bus published, in order.
        acked: Envelopes acknowledged with ``ack()``, in the order of the acks.
        nacked: Envelopes acknowledged with ``ack(rejection)``, with the rejection.
        duplicate_acks: Acks of an already settled message (the seam says: exactly once).
    """

    def __init__(
        self,
        name: str,
        broker: MemoryBroker | None = None,
        *,
        subscriptions: Iterable[str] = (),
        inbox_size: int = 1000,
        publish_delay: float = 0.0,
    ) -> None:
        if inbox_size < 1:
            raise ValueError(f"{name}: inbox_size must be at least 1")
        self.name = name
        self.broker = broker if broker is not None else MemoryBroker()
        self.inbox_size = inbox_size
        self.publish_delay = publish_delay
        self.published: list[Outbound] = []
        self.acked: list[Envelope] = []
        self.nacked: list[tuple[Envelope, RejectedMessage]] = []
        self.duplicate_acks = 0
        self._filters: list[TopicFilter] = [parse_filter(f) for f in subscriptions]
        self._unread: deque[_Held] = deque()
        self._unsettled: dict[int, _Held] = {}  # read, not settled; insertion = read order
        self._seq = itertools.count()
        self._state = "new"  # "new" → "open" → "closed"
        self._link_up = True
        self._failure: ConnectorError | None = None
        self._failures_left = 0
        self._waiting_publishers = 0
        self._changed = asyncio.Event()

    @property
    def connected(self) -> bool:
        """True while open and not disconnected by `set_connected`."""
        return self._state == "open" and self._link_up

    @property
    def queued(self) -> int:
        """Messages waiting to be read."""
        return len(self._unread)

    @property
    def held(self) -> int:
        """Messages held unsettled (unread or read and not acknowledged); ≤ ``inbox_size``."""
        return len(self._unread) + len(self._unsettled)

    @property
    def unsettled(self) -> list[Envelope]:
        """Envelopes read and not yet acknowledged, in the order they were read."""
        return [held.envelope for held in self._unsettled.values()]

    @property
    def publishes_waiting(self) -> int:
        """Publishes (of any bus) waiting because this bus's inbox is full."""
        return self._waiting_publishers

    def matches(self, topic: str) -> bool:
        """Whether a message on `topic` is delivered to this bus."""
        return any(f.match(topic) is not None for f in self._filters)

    def subscribe(self, topic_filter: str) -> None:
        """Also receive messages whose topic matches `topic_filter` (``+`` and ``#``)."""
        self._filters.append(parse_filter(topic_filter))

    def fail_publish(self, exc: ConnectorError, times: int = 1) -> None:
        """Make the next `times` calls of `publish` raise `exc` (nothing is delivered)."""
        self._failure, self._failures_left = exc, times

    def set_connected(self, up: bool) -> None:
        """Cut or restore the link: while down `publish` waits and nothing is read.

        Restoring it is a reconnect: what was read and not settled is delivered again.
        """
        if up and not self._link_up:
            pending = [*self._unsettled.values(), *self._unread]
            self._unread = deque(sorted(pending, key=lambda held: held.seq))
            self._unsettled.clear()
        self._link_up = up
        self._poke()

    def reconnect(self) -> None:
        """Drop and restore the link (the session persists: unsettled messages come again)."""
        self.set_connected(False)
        self.set_connected(True)

    async def __aenter__(self) -> Self:
        if self._state == "closed":
            raise ConnectorError(f"{self.name}: open failed: closed", retriable=False)
        if self._state == "new":
            self._state = "open"
            self.broker._buses.append(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "closed":
            return
        if self in self.broker._buses:
            self.broker._buses.remove(self)
        self._state = "closed"
        self._poke()  # ends messages(), fails waiting publishes, releases publishers to us

    async def messages(self) -> AsyncIterator[Inbound[Envelope]]:
        """What arrives, in arrival order (redeliveries first), until the bus closes."""
        while True:
            await self._wait(lambda: self._state == "closed" or (self.connected and self.queued))
            if self._state == "closed":
                return
            held = self._unread.popleft()
            held.deliveries += 1
            self._unsettled[held.seq] = held
            yield MemoryInbound(
                held.envelope, self._ack_for(held), held.envelope.topic, held.deliveries > 1
            )

    async def publish(self, message: Outbound) -> None:
        """Deliver `message` to every matching subscriber; waits while one's inbox is full.

        Raises:
            ConnectorError: the injected failure (`fail_publish`); non-retriable when the bus
                is not open or closes while waiting, or the topic is not a topic name.
        """
        self._check_open(message.topic)
        if not message.topic or "+" in message.topic or "#" in message.topic:
            raise ConnectorError(
                f"{self.name}: publish to {message.topic!r} refused: not a topic name",
                retriable=False,
            )
        if self._failure is not None:
            failure = self._failure
            self._failures_left -= 1
            if self._failures_left <= 0:
                self._failure = None
            raise failure
        await self._wait(lambda: self._state != "open" or self._link_up)
        self._check_open(message.topic)
        await self.broker._route(message)
        self.published.append(message)
        if self.publish_delay > 0:
            await asyncio.sleep(self.publish_delay)

    def _check_open(self, topic: str) -> None:
        if self._state != "open":
            why = "closed" if self._state == "closed" else "not open"
            raise ConnectorError(f"{self.name}: publish to {topic!r}: {why}", retriable=False)

    def _poke(self) -> None:
        """Wake every waiter to re-check its condition (one event per state change)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, ready: Callable[[], object]) -> None:
        while not ready():
            await self._changed.wait()

    async def _offer(self, message: Outbound) -> None:
        if self.held >= self.inbox_size:
            self._waiting_publishers += 1
            try:
                await self._wait(lambda: self._state == "closed" or self.held < self.inbox_size)
            finally:
                self._waiting_publishers -= 1
        if self._state == "closed":
            return  # its session is gone; other subscribers still get the message
        seq, m = next(self._seq), message
        envelope = Envelope(
            payload=m.payload or b"",
            source=self.name,
            topic=m.topic,
            key=m.key,
            headers=dict(m.headers),
            content_type=m.content_type,
            qos=m.qos,
            retain=m.retain,
            expiry=None if m.message_expiry is None else float(m.message_expiry),
            response_topic=m.response_topic,
            correlation_data=m.correlation_data,
            id=f"{self.name}#{seq}",  # unique per subscriber; a redelivery keeps it
        )
        self._unread.append(_Held(seq, envelope))
        self._poke()

    def _ack_for(self, held: _Held) -> Ack:
        async def ack(error: RejectedMessage | None = None) -> None:
            if held.settled:
                self.duplicate_acks += 1
                return
            held.settled = True
            # A stale copy's ack (read before a reconnect) settles the redelivered one too.
            if self._unsettled.pop(held.seq, None) is None and held in self._unread:
                self._unread.remove(held)
            if error is None:
                self.acked.append(held.envelope)
            else:
                self.nacked.append((held.envelope, error))
            self._poke()  # room in the inbox

        return ack
