"""THE seam between the bridge's core and every side it talks to: `Source` and `Sink`.

Every endpoint — the MQTT connector, the Kafka source, sink and reply reader, the room side,
the in-memory test double in ``connectors/memory.py`` — implements these protocols and nothing
else is shared between the core and the sides. The contract, Benthos-style:

* An endpoint is an async context manager. ``__aenter__`` connects (or starts connecting: an
  endpoint that cannot reach its far side at start does not fail, it reports ``connected``
  False and keeps trying); it raises `ConnectorError` only for what no retry can fix (bad
  credentials, TLS verification). ``__aexit__`` flushes, commits what was acknowledged, and
  closes; calling it twice is harmless.
* A `Source` yields `Inbound` items in source order per ordering key (Kafka partition, MQTT
  topic). Each carries an `Ack` that the core calls exactly once, after every sink accepted
  the message (``ack()``), or after the core gave up on it (``ack(rejection)``: a **nack**).
  Whatever is never acknowledged is redelivered after a reconnect or restart.
* A `Sink`'s ``publish`` returns only once the far side has the message (Kafka ``acks=all``,
  MQTT PUBACK, livekit-server's SCTP acknowledgement) and raises `ConnectorError` otherwise,
  with ``retriable`` saying whether trying again can help. Awaiting it is the backpressure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Protocol, Self, TypeVar, runtime_checkable

from bridge.errors import RejectedMessage

if TYPE_CHECKING:
    from bridge.room.room import Room

M = TypeVar("M")
M_co = TypeVar("M_co", covariant=True)
M_contra = TypeVar("M_contra", contravariant=True)


class Ack(Protocol):
    """Tells the source what became of one message; called exactly once per message."""

    async def __call__(self, error: RejectedMessage | None = None) -> None:
        """Settle the message.

        Args:
            error: None when every sink accepted the message: the source may forget it (MQTT
                PUBACK, Kafka commit). A `RejectedMessage` when the bridge gave up on it for
                good (dead-lettered elsewhere or dropped): the source forgets it too, telling
                its broker where it can — MQTT 5 sends the PUBACK with reason code 0x80
                (unspecified error) or 0x99 (payload format invalid), Kafka commits past the
                record, MQTT 3.1.1 has no negative acknowledgement and sends a plain PUBACK.

        Never leave a message unsettled on purpose: MQTT PUBACKs go out in arrival order and
        Kafka commits the highest contiguous offset, so one hanging ack withholds every later
        one of its connection or partition.
        """
        ...


@dataclass(frozen=True, slots=True)
class Inbound(Generic[M_co]):
    """A message from a source together with the acknowledgement that settles it.

    Attributes:
        message: What the source produced (an `Envelope` from a bus, a `RoomMessage` from a
            room).
        ack: Settles the message (see `Ack`).
        key: The ordering key: messages with the same key must be handled in order; the core
            may handle different keys concurrently (Kafka ``topic/partition``, MQTT topic).
    """

    message: M_co
    ack: Ack
    key: str = ""


class Endpoint(Protocol):
    """Something the bridge connects to; `name` appears in logs and metrics."""

    name: str

    @property
    def connected(self) -> bool:
        """True while the far side is reachable and the endpoint can do its work."""
        ...

    async def __aenter__(self) -> Self:
        """Connect, or start connecting in the background (see the module docstring)."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Flush, commit what was acknowledged, close. Idempotent."""
        ...


class Source(Endpoint, Protocol[M_co]):
    """Where messages come from."""

    def messages(self) -> AsyncIterator[Inbound[M_co]]:
        """Inbound messages, in source order per key, until the endpoint closes."""
        ...


class Sink(Endpoint, Protocol[M_contra]):
    """Where messages go to."""

    async def publish(self, message: M_contra) -> None:
        """Return once the far side accepted `message`.

        Raises:
            ConnectorError: with ``retriable`` True when trying again later may succeed
                (disconnected, timeout), False when it never will (too large, refused).
        """
        ...


@runtime_checkable
class Subscriber(Protocol):
    """A source whose topic filters can change while it runs (MQTT), for hot reload."""

    def add_subscription(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe to `topic_filter` now if connected, and again on every reconnect."""
        ...

    def remove_subscription(self, topic_filter: str) -> None:
        """Unsubscribe from `topic_filter` now if connected, and not again on reconnects."""
        ...


async def no_ack(error: RejectedMessage | None = None) -> None:
    """The acknowledgement of a message whose source cannot redeliver (a room event)."""


class JoinedRoom(Protocol):
    """A room the bridge keeps joined (`bridge.runtime.room_link.RoomLink`), as RPC sees it."""

    name: str

    @property
    def room(self) -> Room | None:
        """The current session, None while (re)joining."""
        ...

    async def ready(self) -> Room:
        """The connected room; waits while it rejoins."""
        ...

    def sender_sid(self, identity: str) -> str:
        """The sid of participant `identity` in the current session, or ''."""
        ...
