"""Room ownership across replicas: one owner per room, from an existing engine's group protocol.

Every room the configuration selects hashes onto one partition of a control topic
(`room_partition`, a stable hash: every replica computes the same). A group membership — Kafka's
consumer-group protocol, `connectors.kafka_group.KafkaMembership` — assigns the partitions to
the live replicas; a replica owns exactly the rooms of its partitions. `Ownership` turns the
assignment into joins and leaves:

* **acquire** (a room's partition assigned): subscribe to the room's bus topics and set up its
  room link (``prepare``: what arrives meanwhile waits for the join, unacknowledged), wait until
  the previous owner's participant has left the room (at most ``handover_timeout``: a crashed
  owner lingers in LiveKit until its session times out, and is then evicted by our join), join.
* **release** (the partition assigned elsewhere, or the replica stops): keep the subscriptions
  and keep delivering for ``handover_overlap`` seconds, so the new owner subscribes before this
  one stops listening; then unsubscribe, let the deliveries into the room finish, leave the
  room, flush the room-to-bus buffers.

The handover overlaps instead of leaving a gap: a bus message published while both owners
listen reaches the room twice (once from each), none is lost. A room released before its join
(it moved on during the handover wait) rejects what it held (``unknown_room``), as a replica
that does not own the room would.

Kafka's classic protocol (the one aiokafka speaks) is *eager*: every rebalance first revokes
all partitions of every member. Leaving every room on each revocation would rejoin every room
of every replica whenever one replica comes or goes, so a revocation only marks the replica as
rebalancing; rooms are released when the new assignment shows them gone (the sticky assignor
keeps the others where they are). A leaving replica (SIGTERM) leaves the group first (the
rebalance gives its rooms to the others, which subscribe), keeps delivering for
``handover_overlap``, then releases its rooms; their new owners join once it left each room.

The fence is LiveKit's: every replica joins room R with the same identity (``identity``,
derived from R), so two replicas that briefly both believe they own R cannot both stay; the
evicted one (DUPLICATE_IDENTITY) backs off ``evicted_backoff`` and rejoins only if the group
still gives it the room.

Every move is logged and counted: ``ownership.acquired``, ``ownership.released``,
``ownership.rebalances``, ``ownership.evicted``, ``ownership.handover_waited``,
``ownership.handover_timeouts``; ``ownership.rooms`` is the number owned now. The overlap's
duplicates are bounded by ``ownership.overlap_delivered`` (deliveries of a releasing owner
during its overlap) and ``ownership.overlap_held`` (deliveries a new owner received before its
join); ``ownership.overlap_rooms`` counts the rooms released with an overlap,
``ownership.overlap_abandoned`` the held deliveries rejected because the room moved on first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from bridge.envelope import Envelope
from bridge.errors import RejectedMessage
from bridge.room.delivery import Delivery
from bridge.room.types import Counters
from bridge.router import RoomDelivery
from bridge.rules import RouteRules

log = logging.getLogger("roombus.ownership")

HANDOVER_POLL = 0.25  # seconds between looks at the room while the previous owner leaves


def room_partition(room: str, partitions: int) -> int:
    """The control-topic partition of `room`: stable across processes, versions and hosts."""
    digest = hashlib.sha256(room.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


class Assignment(Protocol):
    """What a membership tells about the partitions of the control topic."""

    async def revoked(self, partitions: frozenset[int]) -> None:
        """A rebalance started: these partitions are no longer assigned until `assigned`."""
        ...

    async def assigned(self, partitions: frozenset[int], total: int) -> None:
        """The rebalance ended: these are the partitions of this replica (of `total`)."""
        ...


class Membership(Protocol):
    """A replica's membership in the group that assigns the partitions (an existing engine)."""

    name: str

    async def run(self, listener: Assignment) -> None:
        """Join the group and report assignments to `listener` until `leave` or cancelled."""
        ...

    async def leave(self) -> None:
        """Leave the group now (the others take the partitions at once)."""
        ...


class Ownership:
    """The rooms this replica owns, and the moves between replicas (see the module docstring).

    Args:
        acquire: Take room R: join it (after `prepare` and the handover wait). Runs in a task.
        release: Give room R up: unsubscribe, finish deliveries, leave, flush. Awaited.
        present: Whether the room's bridge identity is in the room now (server API), for the
            handover wait; None skips the wait.
        prepare: Before the handover wait: subscribe to R's bus topics, set up its link.
        handover_overlap: Seconds a released room keeps its subscriptions and deliveries.
        deliveries: The tracked deliveries (held before a join, counted in an overlap).
    """

    def __init__(
        self,
        replica: str,
        counters: Counters,
        *,
        acquire: Callable[[str], Awaitable[None]],
        release: Callable[[str], Awaitable[None]],
        present: Callable[[str], Awaitable[bool]] | None = None,
        prepare: Callable[[str], Awaitable[None]] | None = None,
        handover_timeout: float = 10.0,
        handover_overlap: float = 0.0,
        evicted_backoff: float = 10.0,
        deliveries: TrackedDeliveries | None = None,
    ) -> None:
        self.replica = replica
        self.counters = counters
        self._acquire = acquire
        self._release = release
        self._present = present
        self._prepare = prepare
        self.handover_timeout = handover_timeout
        self.handover_overlap = handover_overlap
        self.deliveries = deliveries
        self.evicted_backoff = evicted_backoff
        self.candidates: set[str] = set()  # rooms the configuration selects (seen so far)
        self.partitions: frozenset[int] = frozenset()
        self.total = 0  # partitions of the control topic; 0 before the first assignment
        self.owned: set[str] = set()  # acquired (joining or joined), not released
        self.rebalancing = False
        self.stopping = False
        self._lock = asyncio.Lock()  # one assignment change at a time
        self._acquiring: dict[str, asyncio.Task[None]] = {}

    def snapshot(self) -> dict[str, object]:
        """What this replica owns now, for ``/status`` (JSON-ready)."""
        deliveries = self.deliveries
        return {
            "replica": self.replica,
            "partitions": sorted(self.partitions),
            "of_partitions": self.total,
            "rebalancing": self.rebalancing,
            "stopping": self.stopping,
            "rooms_owned": sorted(self.owned),
            "rooms_joining": sorted(self._acquiring),
            "rooms_elsewhere": sorted(r for r in self.candidates if r not in self.owned),
            "rooms_in_overlap": sorted(deliveries.overlapping) if deliveries else [],
        }

    def owns(self, room: str) -> bool:
        """Whether the current assignment gives `room` to this replica."""
        return (
            not self.stopping
            and self.total > 0
            and room_partition(room, self.total) in self.partitions
        )

    async def add_rooms(self, rooms: Iterable[str]) -> None:
        """Rooms the configuration selects (static, or found by discovery)."""
        new = [r for r in rooms if r not in self.candidates]
        if not new:
            return
        async with self._lock:
            self.candidates.update(new)
            if not self.rebalancing:
                for room in new:
                    if self.owns(room):
                        self._start(room)

    # ------------------------------------------------------------------ Assignment

    async def revoked(self, partitions: frozenset[int]) -> None:
        """A rebalance started: keep the rooms until the new assignment says otherwise."""
        self.rebalancing = True
        self.counters.inc("ownership.rebalances")
        log.info(
            "ownership: %s: rebalance started (%d partitions revoked, %d rooms kept meanwhile)",
            self.replica,
            len(partitions),
            len(self.owned),
        )

    async def assigned(self, partitions: frozenset[int], total: int) -> None:
        """The new assignment: release the rooms gone elsewhere, acquire the new ones."""
        async with self._lock:
            self.partitions, self.total, self.rebalancing = partitions, total, False
            gone = sorted(r for r in self.owned if not self.owns(r))
            new = sorted(r for r in self.candidates if self.owns(r) and r not in self.owned)
            log.info(
                "ownership: %s: assigned partitions %s of %d: %d rooms owned, releasing %d,"
                " acquiring %d",
                self.replica,
                sorted(partitions),
                total,
                len(self.owned) - len(gone) + len(new),
                len(gone),
                len(new),
            )
            # Acquire first (the subscriptions go out now), then release with the overlap: the
            # new owners subscribe meanwhile and wait for our participant to leave
            # (`handover_timeout`).
            for room in new:
                self._start(room)
            await asyncio.gather(*(self._give_up(room, "assigned elsewhere") for room in gone))
            self.counters["ownership.rooms"] = len(self.owned)

    # ------------------------------------------------------------------ moves

    def _start(self, room: str) -> None:
        if self.stopping or room in self.owned:
            return
        self.owned.add(room)
        self._acquiring[room] = asyncio.create_task(
            self._take(room), name=f"roombus[ownership:acquire:{room}]"
        )

    async def _take(self, room: str) -> None:
        started = time.monotonic()
        try:
            if self.deliveries is not None:
                self.deliveries.hold(room)
            if self._prepare is not None:
                await self._prepare(room)
            await self._await_previous_owner(room)
            if room in self.owned and not self.stopping:
                await self._acquire(room)
                if self.deliveries is not None:
                    self.deliveries.joined(room)
                self.counters.inc("ownership.acquired")
                log.info(
                    "ownership: %s: acquired room %s (partition %d) in %.2f s",
                    self.replica,
                    room,
                    room_partition(room, self.total),
                    time.monotonic() - started,
                    extra={"room": room},
                )
        finally:
            self._acquiring.pop(room, None)

    async def _await_previous_owner(self, room: str) -> None:
        if self._present is None or self.handover_timeout <= 0:
            return
        deadline = time.monotonic() + self.handover_timeout
        waited = False
        while room in self.owned and not self.stopping:
            try:
                if not await self._present(room):
                    break
            except Exception as exc:  # noqa: BLE001 -- the server API is down: the fence holds
                log.warning("ownership: room %s: cannot see the previous owner: %s", room, exc)
                break
            if time.monotonic() >= deadline:
                self.counters.inc("ownership.handover_timeouts")
                log.warning(
                    "ownership: %s: room %s: the previous owner is still there after %.0f s;"
                    " joining (LiveKit evicts it)",
                    self.replica,
                    room,
                    self.handover_timeout,
                    extra={"room": room},
                )
                break
            waited = True
            await asyncio.sleep(HANDOVER_POLL)
        if waited:
            self.counters.inc("ownership.handover_waited")

    async def _give_up(self, room: str, why: str) -> None:
        started = time.monotonic()
        self.owned.discard(room)
        task = self._acquiring.pop(room, None)
        overlap = 0.0
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.deliveries is not None:
                self.deliveries.abandon(room)  # never joined: what it held is rejected
        elif self.handover_overlap > 0:
            # Keep listening and delivering while the new owner subscribes (module docstring).
            overlap = self.handover_overlap
            self.counters.inc("ownership.overlap_rooms")
            if self.deliveries is not None:
                self.deliveries.overlapping.add(room)
            try:
                await asyncio.sleep(overlap)
            finally:
                if self.deliveries is not None:
                    self.deliveries.overlapping.discard(room)
        await self._release(room)
        if self.deliveries is not None:
            self.deliveries.joined(room)  # unknown from now on (the room sink rejects)
        self.counters.inc("ownership.released")
        log.info(
            "ownership: %s: released room %s (%s; overlap %.1f s, drained in %.2f s)",
            self.replica,
            room,
            why,
            overlap,
            time.monotonic() - started - overlap,
            extra={"room": room},
        )

    async def stop(self, leave: Callable[[], Awaitable[None]] | None = None) -> None:
        """The replica stops: `leave` the group, then release every room (with the overlap).

        Leaving first lets the rebalance give the rooms to the others while this replica still
        delivers; each room is released after ``handover_overlap``.
        """
        self.stopping = True
        if leave is not None:
            await leave()
        async with self._lock:
            await asyncio.gather(
                *(self._give_up(room, "replica stopping") for room in sorted(self.owned))
            )
            self.counters["ownership.rooms"] = 0

    async def evicted(self, room: str) -> bool:
        """Another replica joined `room` as its owner (DUPLICATE_IDENTITY): back off.

        True (rejoin) only if the group still gives this replica the room afterwards.
        """
        self.counters.inc("ownership.evicted")
        log.warning(
            "ownership: %s: evicted from room %s by another owner; backing off %.0f s",
            self.replica,
            room,
            self.evicted_backoff,
            extra={"room": room},
        )
        await asyncio.sleep(self.evicted_backoff)
        if self.owns(room) and room in self.owned:
            log.warning("ownership: %s: room %s is still ours; rejoining", self.replica, room)
            return True
        return False


@functools.cache
def replica_name(configured: str | None) -> str:
    """This replica's name: `configured`, or host name and process id (fixed for the run)."""
    if configured:
        return configured
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def room_identity(template: str, identity: str, room: str) -> str:
    """The bridge's identity in `room` under replicas: the same on every replica (the fence)."""
    return template.replace("{identity}", identity).replace("{room}", room)


class RoomDeliveries(Protocol):
    """Bus-to-room deliveries (`bridge.runtime.room_sink.RoomSink`)."""

    async def deliver(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None = None
    ) -> None:
        """Deliver `d` into its room."""
        ...

    async def send(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None
    ) -> Delivery | None:
        """Queue a reliable packet now, or None (see `RoomSink.send`)."""
        ...

    def confirmed(self, route: str, d: RoomDelivery, envelope: Envelope) -> None:
        """A packet `send` queued was acknowledged."""
        ...


class TrackedDeliveries:
    """`RoomDeliveries` that counts the deliveries in progress per room.

    A released room is left only once what was read for it is delivered. A room being acquired
    (`hold` until `joined`) holds its deliveries until the join; `abandon` rejects them. A room
    in `overlapping` (released, still delivering) counts its deliveries.
    """

    def __init__(self, inner: RoomDeliveries, counters: Counters | None = None) -> None:
        self.inner = inner
        self.counters = counters if counters is not None else Counters()
        self.in_flight: Counter[str] = Counter()
        self.last: dict[str, float] = {}  # room -> when its last delivery started or ended
        self.overlapping: set[str] = set()  # released rooms in their handover overlap
        self._held: dict[str, asyncio.Event] = {}  # room being acquired -> set when abandoned

    def hold(self, room: str) -> None:
        """`room` is being acquired: its deliveries wait for the join (or `abandon`)."""
        held = self._held.get(room)
        if held is None or held.is_set():
            self._held[room] = asyncio.Event()

    def joined(self, room: str) -> None:
        """`room` is joined (or released for good): deliveries into it go straight through."""
        self._held.pop(room, None)

    def abandon(self, room: str) -> None:
        """`room` is released before its join: what it holds (until `joined`) is rejected."""
        abandoned = self._held.get(room)
        if abandoned is not None:
            abandoned.set()

    async def deliver(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None = None
    ) -> None:
        """Deliver `d` through the wrapped deliveries, counted for its room."""
        self.in_flight[d.room] += 1
        self.last[d.room] = time.monotonic()
        try:
            abandoned = self._held.get(d.room)
            if abandoned is None:
                if d.room in self.overlapping:
                    self.counters.inc("ownership.overlap_delivered")
                await self.inner.deliver(route, d, envelope, rules)
            else:
                self.counters.inc("ownership.overlap_held")
                await self._deliver_held(abandoned, route, d, envelope, rules)
        finally:
            self.in_flight[d.room] -= 1
            if not self.in_flight[d.room]:
                del self.in_flight[d.room]
            self.last[d.room] = time.monotonic()

    async def send(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None
    ) -> Delivery | None:
        """Always None: with replicas every delivery goes one by one through `deliver`.

        So that a handover sees exactly what is in progress per room (`in_flight`), and a held
        room holds everything: pipelined packets would be in flight past those counts.
        """
        return None

    def confirmed(self, route: str, d: RoomDelivery, envelope: Envelope) -> None:
        """Not called: `send` never queues anything."""
        self.inner.confirmed(route, d, envelope)

    async def _deliver_held(
        self,
        abandoned: asyncio.Event,
        route: str,
        d: RoomDelivery,
        envelope: Envelope,
        rules: RouteRules | None,
    ) -> None:
        delivery = asyncio.ensure_future(self.inner.deliver(route, d, envelope, rules))
        waiter = asyncio.ensure_future(abandoned.wait())
        try:
            await asyncio.wait((delivery, waiter), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            delivery.cancel()
            raise
        finally:
            waiter.cancel()
        if not delivery.done():
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await delivery
            self.counters.inc("ownership.overlap_abandoned")
            raise RejectedMessage(
                "unknown_room", f"room {d.room!r} moved to another replica before this one joined"
            )
        delivery.result()

    async def quiet(self, room: str, settle: float, within: float) -> bool:
        """Wait until no delivery into `room` is in progress nor started for `settle` s.

        What the broker sent before the unsubscribe arrives meanwhile. False after `within`
        seconds without that.
        """
        deadline = time.monotonic() + within
        while True:
            now = time.monotonic()
            if not self.in_flight.get(room) and now - self.last.get(room, 0.0) >= settle:
                self.last.pop(room, None)
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(0.05)
