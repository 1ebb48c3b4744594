"""Room ownership across replicas: one owner per room, from an existing engine's group protocol.

Every room the configuration selects hashes onto one partition of a control topic
(`room_partition`, a stable hash: every replica computes the same). A group membership — Kafka's
consumer-group protocol, `connectors.kafka_group.KafkaMembership` — assigns the partitions to
the live replicas; a replica owns exactly the rooms of its partitions. `Ownership` turns the
assignment into joins and leaves:

* **acquire** (a room's partition assigned): subscribe to the room's bus topics, wait until the
  previous owner's participant has left the room (at most ``handover_timeout``: a crashed owner
  lingers in LiveKit until its session times out, and is then evicted by our join), join.
* **release** (the partition assigned elsewhere, or the replica stops): unsubscribe, let the
  deliveries into the room finish, leave the room, flush the room-to-bus buffers.

Kafka's classic protocol (the one aiokafka speaks) is *eager*: every rebalance first revokes
all partitions of every member. Leaving every room on each revocation would rejoin every room
of every replica whenever one replica comes or goes, so a revocation only marks the replica as
rebalancing; rooms are released when the new assignment shows them gone (the sticky assignor
keeps the others where they are). A leaving replica (SIGTERM) releases all its rooms *before*
it leaves the group, so its rooms' new owners join only after it drained.

The fence is LiveKit's: every replica joins room R with the same identity (``identity``,
derived from R), so two replicas that briefly both believe they own R cannot both stay; the
evicted one (DUPLICATE_IDENTITY) backs off ``evicted_backoff`` and rejoins only if the group
still gives it the room.

Every move is logged and counted: ``ownership.acquired``, ``ownership.released``,
``ownership.rebalances``, ``ownership.evicted``, ``ownership.handover_waited``,
``ownership.handover_timeouts``; ``ownership.rooms`` is the number owned now.
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
        acquire: Take room R: subscribe, wait for the previous owner, join. Runs as a task.
        release: Give room R up: unsubscribe, finish deliveries, leave, flush. Awaited.
        present: Whether the room's bridge identity is in the room now (server API), for the
            handover wait; None skips the wait.
    """

    def __init__(
        self,
        replica: str,
        counters: Counters,
        *,
        acquire: Callable[[str], Awaitable[None]],
        release: Callable[[str], Awaitable[None]],
        present: Callable[[str], Awaitable[bool]] | None = None,
        handover_timeout: float = 10.0,
        evicted_backoff: float = 10.0,
    ) -> None:
        self.replica = replica
        self.counters = counters
        self._acquire = acquire
        self._release = release
        self._present = present
        self.handover_timeout = handover_timeout
        self.evicted_backoff = evicted_backoff
        self.candidates: set[str] = set()  # rooms the configuration selects (seen so far)
        self.partitions: frozenset[int] = frozenset()
        self.total = 0  # partitions of the control topic; 0 before the first assignment
        self.owned: set[str] = set()  # acquired (joining or joined), not released
        self.rebalancing = False
        self.stopping = False
        self._lock = asyncio.Lock()  # one assignment change at a time
        self._acquiring: dict[str, asyncio.Task[None]] = {}

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
            # Release first, before the rebalance completes for us: the new owners wait for
            # our participant to leave (`handover_timeout`).
            await asyncio.gather(*(self._give_up(room, "assigned elsewhere") for room in gone))
            for room in new:
                self._start(room)
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
            await self._await_previous_owner(room)
            if room in self.owned and not self.stopping:
                await self._acquire(room)
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
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._release(room)
        self.counters.inc("ownership.released")
        log.info(
            "ownership: %s: released room %s (%s; drained in %.2f s)",
            self.replica,
            room,
            why,
            time.monotonic() - started,
            extra={"room": room},
        )

    async def stop(self) -> None:
        """Release every room (the replica stops: before it leaves the group)."""
        async with self._lock:
            self.stopping = True
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


class TrackedDeliveries:
    """`RoomDeliveries` that counts the deliveries in progress per room.

    A released room is left only once what was read for it is delivered.
    """

    def __init__(self, inner: RoomDeliveries) -> None:
        self.inner = inner
        self.in_flight: Counter[str] = Counter()
        self.last: dict[str, float] = {}  # room -> when its last delivery started or ended

    async def deliver(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None = None
    ) -> None:
        """Deliver `d` through the wrapped deliveries, counted for its room."""
        self.in_flight[d.room] += 1
        self.last[d.room] = time.monotonic()
        try:
            await self.inner.deliver(route, d, envelope, rules)
        finally:
            self.in_flight[d.room] -= 1
            if not self.in_flight[d.room]:
                del self.in_flight[d.room]
            self.last[d.room] = time.monotonic()

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
