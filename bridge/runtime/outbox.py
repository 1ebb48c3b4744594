"""One room-to-bus route's outgoing side: render, buffer, publish with a window in flight.

LiveKit cannot redeliver, so from the moment a room event is offered here the bridge owns it.
`offer` is synchronous and never blocks the room's event dispatch: it renders the route's
templates (a bad value is a rejection, decided by the route's ``on_reject``) and appends the
`Outbound` to the route's buffer:

* in memory (`bridge.queue_size` messages), or
* in the spool (`bridge.spool`), durable across bus outages, restarts and crashes: the
  messages of one event-loop turn are written in one transaction, and a message leaves the
  spool only once the broker acknowledged it. After a restart the spool is replayed first, in
  order.

At the buffer's limit the overflow policy drops the newest or the oldest message, counted as
``route.<name>.dropped.overflow``. A route with a ``rate`` asks its `RateLimiter` first: what is
over the rate is held (and rendered once released, from the limiter's timer that runs in this
outbox's task), coalesced or dropped there; `drain` releases what it still holds.

`window` workers publish concurrently: each takes the next message in buffer order and calls
the sink at once, so the sink sees the calls in order (Kafka batches them with its linger and
keeps per-partition order with the idempotent producer; MQTT writes them in order on one
connection) while up to `window` wait for their acknowledgements.

A retriable failure closes the window, so that no message overtakes one that must be sent
again (per-key order: a Kafka key's partition, an MQTT topic, across a bus outage):

1. the worker whose publish failed keeps the message aside (by sequence) and hands out nothing
   new, nor does any other worker;
2. once every publish that was in flight has settled (accepted, refused, or failed too and kept
   aside), the route's one retry loop (`_recover`) retries the oldest kept message alone, with
   the bridge's backoff (`Publisher.retry`: capped full jitter), until the broker takes it;
3. then the window opens again: the other kept messages go out first, oldest first, then the
   buffer. If one of them fails again, the same steps repeat.

The steady state pays nothing for this: one attempt per message, no extra task or await. A
non-retriable error is a rejection, decided once by `Rejections` as before, and does not close
the window. Within a window the sink is called in order; that messages in flight together reach
the broker in that order (when an earlier one fails and a later one does not) is the sink's
promise, not the outbox's — and so is the order of what a sink retries inside one call before
it reports a failure (the Kafka sink retries until its ``delivery_timeout``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import operator
from typing import Protocol

from bridge.endpoint import Sink
from bridge.envelope import H_KIND, H_PARTICIPANT, H_ROOM, H_TOPIC, Outbound
from bridge.errors import RejectedMessage
from bridge.room.types import Counters
from bridge.router import RoomMessage, ToBusRoute
from bridge.runtime.dead_letter import Rejected, Rejections
from bridge.runtime.publisher import Publisher
from bridge.runtime.ratelimit import Decision, RateLimiter, RateSpec

log = logging.getLogger("roombus.outbox")


class DurableQueue(Protocol):
    """What the outbox needs of a route's spool (`bridge.spool.RouteSpool`)."""

    def append_many(self, items: list[tuple[str, bytes]]) -> list[int | None]:
        """Write items (key, blob) in one transaction; a seq each, None if dropped."""
        ...

    def pending(self, limit: int, after_seq: int = 0) -> list[tuple[int, str, bytes]]:
        """Up to `limit` items after `after_seq`, oldest first."""
        ...

    def remove(self, seqs: list[int]) -> object:
        """Forget acknowledged items."""
        ...

    @property
    def count(self) -> int:
        """Items spooled."""
        ...


class OutboundCodec(Protocol):
    """Turns an `Outbound` into spool bytes and back."""

    def encode(self, message: Outbound, received_at: float) -> bytes:
        """Serialize."""
        ...

    def decode(self, blob: bytes) -> tuple[Outbound, float]:
        """Deserialize."""
        ...


class Outbox:
    """The buffer and publishers of one room-to-bus route (see the module docstring)."""

    def __init__(
        self,
        route: ToBusRoute,
        sink: Sink[Outbound],
        publisher: Publisher,
        rejections: Rejections,
        counters: Counters,
        *,
        bridge_id: str,
        queue_size: int,
        overflow: str,
        window: int,
        spool: DurableQueue | None = None,
        codec: OutboundCodec | None = None,
        rate: RateSpec | None = None,
    ) -> None:
        self.route = route
        self.name = route.name
        self.sink = sink
        self.publisher = publisher
        self.rejections = rejections
        self.counters = counters
        self.bridge_id = bridge_id
        self.queue_size = queue_size
        self.overflow = overflow
        self.window = window
        self.spool = spool
        self.codec = codec
        self._prefix = f"route.{route.name}"
        # Memory mode: rendered messages; spool mode: what was read ahead of the spool.
        self._buffer: collections.deque[tuple[int, Outbound]] = collections.deque()
        self._rejects: collections.deque[tuple[RejectedMessage, Rejected]] = collections.deque()
        self._unflushed: list[tuple[str, bytes]] = []
        self._flush_scheduled = False
        self._acked: list[int] = []
        self._remove_scheduled = False
        self._read_after = 0  # the spool's last seq read into the buffer
        self._last_seq = 0  # memory mode: messages are numbered too, for the retry order
        # Idle workers, each waiting on its own future: a new message wakes one of them, not
        # all `window` (with one shared event every message woke every idle worker, 64 task
        # steps per message by default, for one of them to find work).
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._in_flight = 0
        # The ordered retry (see the module docstring): while `_closed`, nothing new is handed
        # out; `_failed` holds what failed retriably, `_attempts` counts publishes not settled,
        # `_resend` is what goes out again, oldest first, before the buffer.
        self._closed = False
        self._failed: list[tuple[int, Outbound]] = []
        self._attempts = 0
        self._resend: collections.deque[tuple[int, Outbound]] = collections.deque()
        self._recovery: asyncio.Future[None] | None = None
        self.limiter: RateLimiter[tuple[RoomMessage, dict[str, str]]] | None = None
        if rate is not None:
            self.limiter = RateLimiter(
                route.name, rate, counters, release=lambda _key, item: self._take(*item)
            )

    # ------------------------------------------------------------------ the room side

    def offer(self, message: RoomMessage) -> None:
        """Take a room event for this route; never blocks (see the module docstring)."""
        route = self.route
        self.counters.inc(f"{self._prefix}.received")
        values = route.values(message)
        limiter = self.limiter
        if limiter is not None and limiter.admit(values, (message, values)) is not Decision.PASS:
            return  # held (rendered when released), or dropped: counted by the limiter
        self._take(message, values)

    def _take(self, message: RoomMessage, values: dict[str, str]) -> None:
        """Render `message` and buffer it (or its rejection)."""
        route = self.route
        try:
            out = route.target.outbound(
                message.payload,
                values,
                message.headers,
                content_type=message.content_type,
                default_key=message.default_key,
                bridge_id=self.bridge_id,
            )
        except RejectedMessage as exc:
            if len(self._rejects) >= self.queue_size:
                self.counters.inc(f"{self._prefix}.dropped.overflow")
                return
            origin = f"room {values.get('room', '')} participant {values.get('participant', '')}"
            self._rejects.append(
                (
                    exc,
                    Rejected(
                        message.payload,
                        values,
                        message.headers,
                        message.content_type,
                        message.default_key,
                        origin,
                    ),
                )
            )
            self._signal()
            return
        if self.spool is not None:
            assert self.codec is not None
            self._unflushed.append((out.topic, self.codec.encode(out, 0.0)))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
            return
        if len(self._buffer) >= self.queue_size:
            self.counters.inc(f"{self._prefix}.dropped.overflow")
            if self.overflow == "drop_newest":
                return
            self._buffer.popleft()
        self._last_seq += 1
        self._buffer.append((self._last_seq, out))
        self._signal()

    def _flush(self) -> None:
        """Write the messages of this loop turn to the spool in one transaction."""
        self._flush_scheduled = False
        items, self._unflushed = self._unflushed, []
        if not items or self.spool is None:
            return
        seqs = self.spool.append_many(items)
        dropped = sum(1 for s in seqs if s is None)
        if dropped:
            self.counters.inc(f"{self._prefix}.dropped.overflow", dropped)
        self._signal()

    def _signal(self) -> None:
        """Wake one idle worker (it wakes the next if more work is waiting).

        While the window is closed only rejections are handed out: nobody is woken for the rest.
        """
        if self._closed and not self._rejects:
            return
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # ------------------------------------------------------------------ the bus side

    @property
    def depth(self) -> int:
        """Messages waiting (buffered, spooled or unflushed), not counting those in flight."""
        if self.spool is not None:
            spooled = self.spool.count - len(self._acked) - self._in_flight
            return len(self._rejects) + len(self._unflushed) + max(0, spooled)
        return len(self._buffer) + len(self._rejects) + len(self._failed) + len(self._resend)

    @property
    def in_flight(self) -> int:
        """Publishes awaiting the broker."""
        return self._in_flight

    async def run(self) -> None:
        """Publish until cancelled, with `window` publishes in flight."""
        async with asyncio.TaskGroup() as tg:
            for i in range(self.window):
                tg.create_task(self._worker(), name=f"roombus[{self.name}].publish-{i}")
            tg.create_task(self._retry_loop(), name=f"roombus[{self.name}].retry")
            if self.limiter is not None:
                tg.create_task(self.limiter.run(), name=f"roombus[{self.name}].rate")

    async def drain(self) -> None:
        """Return once nothing is buffered or in flight (call after the rooms stopped).

        Polls: it runs once, at shutdown, under the caller's deadline.
        """
        if self.limiter is not None:
            self.limiter.flush()  # what the rate limit holds goes out now
        if self._unflushed:
            self._flush()
        while self.depth or self._in_flight:
            self._signal()
            await asyncio.sleep(0.02)

    def _refill(self) -> None:
        """Read the next spooled messages into the buffer (spool mode)."""
        if self.spool is None or self._buffer:
            return
        assert self.codec is not None
        for seq, _key, blob in self.spool.pending(max(64, self.window * 2), self._read_after):
            self._read_after = seq
            out, _ = self.codec.decode(blob)
            self._buffer.append((seq, out))

    async def _worker(self) -> None:
        while True:
            if self._rejects:
                why, rejected = self._rejects.popleft()
                self._in_flight += 1
                if self._buffer or self._rejects:
                    self._signal()
                try:
                    await self.rejections.decide(
                        self.name, self.route.on_reject, self.route.dead_letter, why, rejected
                    )
                finally:
                    self._done()
                continue
            if self._closed:  # a retry is pending: nothing new goes out (the module docstring)
                queue = None
            elif self._resend:
                queue = self._resend
            else:
                if not self._buffer:
                    self._refill()
                queue = self._buffer or None
            if queue is None:
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                await waiter
                continue
            seq, out = queue.popleft()
            self._in_flight += 1
            if self._buffer or self._rejects or self._resend:
                self._signal()  # more waiting: another worker takes the next one
            try:
                await self._publish(seq, out)
            finally:
                self._done()

    def _done(self) -> None:
        self._in_flight -= 1

    async def _publish(self, seq: int, out: Outbound) -> None:
        """One attempt; a retriable failure keeps the message for the ordered retry."""
        self._attempts += 1
        try:
            failed = await self.publisher.attempt(self.sink, out, route=self.name, where=out.topic)
        except RejectedMessage as why:
            self._settled()
            await self._reject(out, why)
        except BaseException:
            self._settled()
            raise
        else:
            if failed is not None:
                self._failed.append((seq, out))
                self._closed = True
                self._settled()
                return  # not settled: `_recover` sends it again, in order
            self._settled()
            self.counters.inc(f"{self._prefix}.published")
        self._acknowledged(seq)

    def _settled(self) -> None:
        """An attempt ended; the last one to end while the window is closed starts the retry."""
        self._attempts -= 1
        recovery = self._recovery
        if self._closed and not self._attempts and recovery is not None and not recovery.done():
            recovery.set_result(None)

    async def _retry_loop(self) -> None:
        """The route's one retry loop: runs `_recover` each time the window closed and settled."""
        loop = asyncio.get_running_loop()
        while True:
            self._recovery = loop.create_future()
            if self._closed and not self._attempts:
                self._recovery.set_result(None)  # closed while this loop was not waiting
            await self._recovery
            await self._recover()

    async def _recover(self) -> None:
        """Retry the oldest failed message alone until the broker takes it; reopen the window."""
        failed = sorted(self._failed, key=operator.itemgetter(0))
        self._failed = []
        seq, out = failed[0]
        self._resend.extendleft(reversed(failed[1:]))  # ahead of any still to be resent
        self._in_flight += 1
        try:
            try:
                await self.publisher.retry(self.sink, out, route=self.name, where=out.topic)
            except RejectedMessage as why:
                await self._reject(out, why)
            except BaseException:
                self._resend.appendleft((seq, out))  # cancelled (shutdown): ours, still first
                raise
            else:
                self.counters.inc(f"{self._prefix}.published")
        finally:
            self._in_flight -= 1
        self._acknowledged(seq)
        self._closed = False  # the broker answered: the window opens, the resends go first
        self._signal()

    async def _reject(self, out: Outbound, why: RejectedMessage) -> None:
        headers = dict(out.headers)
        # The dead-letter templates get the provenance the rendered message still carries.
        values = {
            "room": headers.get(H_ROOM, ""),
            "participant": headers.get(H_PARTICIPANT, ""),
            "topic": headers.get(H_TOPIC, ""),
            "kind": headers.get(H_KIND, ""),
        }
        await self.rejections.decide(
            self.name,
            self.route.on_reject,
            self.route.dead_letter,
            why,
            Rejected(out.payload, values, headers, out.content_type, None, out.topic),
        )

    def _acknowledged(self, seq: int) -> None:
        """`seq` is settled (published or rejected): it may leave the spool."""
        if self.spool is not None:
            # Removes of one loop turn go in one transaction (group commit), like appends.
            self._acked.append(seq)
            if not self._remove_scheduled:
                self._remove_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_removes)

    def _flush_removes(self) -> None:
        self._remove_scheduled = False
        seqs, self._acked = self._acked, []
        if seqs and self.spool is not None:
            self.spool.remove(seqs)
