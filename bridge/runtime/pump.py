"""Bus to room: a source's messages delivered concurrently across keys, in order within a key.

One `BusPump` per bus source (an MQTT connection, a Kafka route's consumer, an RPC reply
reader). Each inbound message goes to the lane of its ordering key (`Inbound.key`: the MQTT
topic, the Kafka partition); a lane handles its messages one after the other, lanes run
concurrently, and at most `max_in_flight` messages of the source are in progress at once (the
bound is the backpressure: the pump stops reading, the source stops acknowledging, the broker
stops sending). A slow or rejoining room therefore delays only the keys that go to it.

A message is acknowledged once every route it matched delivered it into its room (see
`RoomSink`); the source turns acknowledgements into protocol order itself (MQTT PUBACKs in
arrival order, the Kafka commit at the highest contiguous offset). A rejected message is
decided once by the route's ``on_reject`` (`Rejections`); a message that matches no route is
counted and acknowledged, and so is one a route's ``where:`` filters out
(``route.<name>.filtered``). An exception that escapes a delivery is a bug: it is logged with its
traceback and treated as a rejection (reason ``internal_error``), so a lane never dies.

**Pipelined lanes.** A message that goes to one room as a reliable packet along its only route
(the hot path of a device fleet) does not hold its lane until livekit-server acknowledged it:
the lane queues it (`Deliveries.send`, in lane order on the room's ordered channel) and goes on
with the next, keeping up to `LANE_WINDOW` packets in flight, and settles them in order as the
server's SCTP acknowledgements arrive (counted, then acknowledged upstream). Order on the wire
is kept by SCTP; what the lane must add is that nothing overtakes a packet that has to go again:
if the session is lost with packets in flight, they and everything after them are delivered
again one by one (`deliver`, which waits for the rejoin), in order, and a message that needs
the one-by-one path for any other reason (several routes, a rate limit, another kind, a room
that is rejoining) first waits until what the lane has in flight is settled.

Lanes outlive their last message for `LANE_IDLE` seconds, so a steady stream of messages on a
key reuses one task instead of creating one per message.

A route with a ``rate`` asks its `RateLimiter` before delivering. A message it drops
(``drop_newest``) counts as settled for that route; one it holds is settled later, by one
worker task of the pump that delivers what the limiters release, in order. A message is
acknowledged once every route settled it, so a held message is acknowledged after its delivery,
or when a newer one replaced it (``latest``: counted ``coalesced``) or pushed it out
(``drop_oldest``). Held messages delay the acknowledgements behind them on their connection or
partition by at most the rate's interval. When reading ends, the limiters release what they
hold at once (ignoring the rate) and it is delivered before `run` returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from bridge.endpoint import Inbound, Source
from bridge.envelope import H_SOURCE, Envelope
from bridge.errors import RejectedMessage
from bridge.room.delivery import Delivery
from bridge.room.types import Counters
from bridge.router import RoomDelivery, ToRoomRoute
from bridge.rules import RouteRules
from bridge.runtime.dead_letter import Rejected, Rejections
from bridge.runtime.ratelimit import Decision, RateLimiter, RateSpec

if TYPE_CHECKING:
    from bridge.rpcbridge import RpcBridge

log = logging.getLogger("roombus.pump")

LANE_IDLE = 10.0
# Packets one lane keeps in flight (queued, not yet acknowledged by livekit-server) at most.
LANE_WINDOW = 64


class Deliveries(Protocol):
    """Where bus messages go (`bridge.runtime.room_sink.RoomSink`)."""

    async def deliver(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None
    ) -> None:
        """Deliver `d` (to identities `rules` permit); `RejectedMessage` for a refusal."""
        ...

    async def send(
        self, route: str, d: RoomDelivery, envelope: Envelope, rules: RouteRules | None
    ) -> Delivery | None:
        """Queue a reliable packet now and return its `Delivery`; None: `deliver` it instead."""
        ...

    def confirmed(self, route: str, d: RoomDelivery, envelope: Envelope) -> None:
        """A packet `send` queued was acknowledged by livekit-server."""
        ...


class _Ticket:
    """A bus message that rate-limited routes hold: acknowledged once every route settled it."""

    __slots__ = ("error", "inbound", "open", "settle", "waiting")

    def __init__(self, inbound: Inbound[Envelope]) -> None:
        self.inbound = inbound
        self.waiting = 0  # routes still holding it
        self.open = True  # `_handle` has not finished with it yet
        self.settle = True
        self.error: RejectedMessage | None = None

    async def finish(self, ok: bool, error: RejectedMessage | None, *, close: bool = False) -> None:
        """One route settled it (or, with `close`, every other route did)."""
        if close:
            self.open = False
        else:
            self.waiting -= 1
        self.settle = self.settle and ok
        self.error = self.error or error
        if not self.waiting and not self.open and self.settle:
            await self.inbound.ack(self.error)


# (route, envelope, values, ticket): a message a rate limiter holds.
_HeldItem = tuple[ToRoomRoute, Envelope, dict[str, str], _Ticket]


class _Sent:
    """A packet a lane queued and has in flight (see "Pipelined lanes" above)."""

    __slots__ = ("delivery", "inbound", "packet", "route", "values")

    def __init__(
        self,
        inbound: Inbound[Envelope],
        route: ToRoomRoute,
        values: dict[str, str],
        packet: RoomDelivery,
        delivery: Delivery,
    ) -> None:
        self.inbound = inbound
        self.route = route
        self.values = values
        self.packet = packet
        self.delivery = delivery


class _Lane:
    __slots__ = ("items", "last_used", "pending", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[Inbound[Envelope]] = collections.deque()
        self.pending: collections.deque[_Sent] = collections.deque()  # in flight, in order
        self.waiter: asyncio.Future[bool] | None = None
        self.last_used = time.monotonic()


class BusPump:
    """Delivers one bus source's messages into rooms (see the module docstring)."""

    def __init__(
        self,
        name: str,
        source: Source[Envelope],
        routes: Sequence[ToRoomRoute],
        *,
        endpoint: str,
        room_sink: Deliveries,
        rejections: Rejections,
        rpc: RpcBridge | None,
        counters: Counters,
        bridge_id: str,
        max_in_flight: int,
        rates: Mapping[str, RateSpec] | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.routes = list(routes)
        self.endpoint = endpoint
        self.room_sink = room_sink
        self.rejections = rejections
        self.rpc = rpc
        self.counters = counters
        self.bridge_id = bridge_id
        self.max_in_flight = max_in_flight
        self._lanes: dict[str, _Lane] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self._read_ended = False  # reading stopped: lanes end once they hold nothing
        # Rate limits by route; what they release or discard, for `_settle_held`.
        self.limits: dict[str, RateLimiter[_HeldItem]] = {}
        self._held: collections.deque[tuple[_HeldItem, str | None, RateLimiter[_HeldItem]]] = (
            collections.deque()
        )
        self._held_wake = asyncio.Event()
        self._settling = False
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.set_rates(rates or {})

    @property
    def in_flight(self) -> int:
        """Messages taken from the source and not yet settled."""
        return self._in_flight

    async def run(self) -> None:
        """Read the source and deliver until cancelled, `stop_reading`, or the source ends."""
        self._stopping = False
        self._read_ended = False
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            settler = tg.create_task(self._settle_held(), name=f"roombus[{self.name}].held")
            for name in self.limits:
                self._start_timer(name)
            reaper = tg.create_task(self._reap_idle_lanes(), name=f"roombus[{self.name}].lanes")
            self._reader = tg.create_task(self._read(tg), name=f"roombus[{self.name}].read")
            try:
                await asyncio.shield(self._reader)
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
            reaper.cancel()
            # No more messages: let the lanes finish what they hold, then end. A lane busy now
            # sees `_read_ended` when it is done (it would otherwise wait for more, forever).
            self._read_ended = True
            for lane in list(self._lanes.values()):
                if lane.waiter is not None and not lane.waiter.done():
                    lane.waiter.set_result(False)
            tg.create_task(self._wind_down(settler), name=f"roombus[{self.name}].wind-down")
        self._tg = None

    def set_rates(self, rates: Mapping[str, RateSpec]) -> None:
        """Set the routes' rate limits from now on (also on a reload).

        A changed limiter is replaced, and the old one releases what it holds at once.
        """
        for name, old in list(self.limits.items()):
            if rates.get(name) != old.spec:
                del self.limits[name]
                timer = self._timers.pop(name, None)
                if timer is not None:
                    timer.cancel()
                old.flush()
        for name, spec in rates.items():
            if name not in self.limits:
                self.limits[name] = self._limiter(name, spec)
                if self._tg is not None:
                    self._start_timer(name)

    def _limiter(self, name: str, spec: RateSpec) -> RateLimiter[_HeldItem]:
        held, wake = self._held, self._held_wake

        # Each entry names its limiter: one a reload replaced still gets its `settled`.
        def release(key: str, item: _HeldItem) -> None:
            held.append((item, key, limiter))
            wake.set()

        def discard(item: _HeldItem) -> None:
            held.append((item, None, limiter))
            wake.set()

        limiter = RateLimiter(
            name, spec, self.counters, release=release, discard=discard, track_release=True
        )
        return limiter

    def _start_timer(self, name: str) -> None:
        assert self._tg is not None
        task = self._tg.create_task(self.limits[name].run(), name=f"roombus[{name}].rate")
        self._timers[name] = task

    async def _settle_held(self) -> None:
        """Deliver what the rate limiters release, in order; acknowledge what they discard."""
        while True:
            if not self._held:
                self._held_wake.clear()
                await self._held_wake.wait()
                continue
            (route, envelope, values, ticket), key, limiter = self._held.popleft()
            if key is None:
                await ticket.finish(True, None)
                continue
            self._settling = True
            try:
                ok, why = await self._deliver_guarded(route, envelope, values)
            finally:
                self._settling = False
                limiter.settled(key)
            await ticket.finish(ok, why)

    async def _wind_down(self, settler: asyncio.Task[None]) -> None:
        """Reading ended: deliver what the rate limits hold, then stop the pump's helpers.

        Waits until the lanes settled what they took (polling: once, when reading ends, under
        the caller's deadline), flushes the limiters, waits until what they released settled.
        """
        while True:
            if not self._in_flight:
                break
            await asyncio.sleep(0.02)
        for limiter in self.limits.values():
            limiter.flush()
        while True:
            if not (self._held or self._settling):
                break
            await asyncio.sleep(0.02)
        settler.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def stop_reading(self) -> None:
        """Stop taking messages; `run` returns once the deliveries in progress finished."""
        self._stopping = True
        if self._reader is not None:
            self._reader.cancel()

    async def _read(self, tg: asyncio.TaskGroup) -> None:
        async for inbound in self.source.messages():
            await self._slots.acquire()
            self._in_flight += 1
            lane = self._lanes.get(inbound.key)
            if lane is None:
                lane = self._lanes[inbound.key] = _Lane()
                lane.items.append(inbound)
                tg.create_task(self._lane(inbound.key, lane), name=f"roombus[{self.name}].lane")
                continue
            lane.items.append(inbound)
            if lane.waiter is not None and not lane.waiter.done():
                lane.waiter.set_result(True)

    async def _lane(self, key: str, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while lane.items or lane.pending:
                    if lane.items and len(lane.pending) < LANE_WINDOW:
                        inbound = lane.items.popleft()
                        sent: _Sent | None = None
                        try:
                            sent = await self._handle(inbound, lane)
                        finally:
                            if sent is None:
                                self._settled()
                        if sent is not None:
                            lane.pending.append(sent)
                        continue
                    # Nothing more to queue now (or the window is full): wait for the oldest.
                    await self._settle(lane, wait_all=False)
                lane.last_used = time.monotonic()
                if self._read_ended:
                    return
                lane.waiter = loop.create_future()
                if not await lane.waiter:
                    return
        finally:
            if self._lanes.get(key) is lane:
                del self._lanes[key]

    def _settled(self) -> None:
        self._in_flight -= 1
        self._slots.release()

    async def _settle(self, lane: _Lane, *, wait_all: bool) -> None:
        """Settle the lane's packets in flight, oldest first, as livekit-server acknowledges them.

        Waits for the oldest one (for all of them with `wait_all`), then settles every one
        that is done. A packet lost with the session goes again, and so does everything queued
        after it, one by one and in order (`_deliver_guarded` waits for the rejoin).
        """
        pending = lane.pending
        progressed = False
        while pending:
            head = pending[0]
            if not head.delivery.done():
                if progressed and not wait_all:
                    return
                with contextlib.suppress(Exception):
                    await head.delivery  # its failure is read below
            if head.delivery.failed() is not None:
                again = list(pending)
                pending.clear()
                self.counters.inc(f"source.{self.name}.resent_after_loss", len(again))
                for item in again:
                    try:
                        ok, why = await self._deliver_guarded(
                            item.route, item.inbound.message, item.values
                        )
                        if ok:
                            await item.inbound.ack(why)
                    finally:
                        self._settled()
                return
            pending.popleft()
            progressed = True
            try:
                self.counters.inc(f"route.{head.route.name}.delivered")
                self.room_sink.confirmed(head.route.name, head.packet, head.inbound.message)
                await head.inbound.ack()
            finally:
                self._settled()

    async def _reap_idle_lanes(self) -> None:
        while True:
            await asyncio.sleep(LANE_IDLE)
            now = time.monotonic()
            for lane in list(self._lanes.values()):
                idle = (
                    lane.waiter is not None
                    and not lane.waiter.done()
                    and not lane.items
                    and not lane.pending
                )
                if idle and now - lane.last_used > LANE_IDLE and lane.waiter is not None:
                    lane.waiter.set_result(False)

    async def _handle(self, inbound: Inbound[Envelope], lane: _Lane | None = None) -> _Sent | None:
        """Handle one message of `lane`: settled here, or queued (the `_Sent` the lane settles)."""
        envelope = inbound.message
        if envelope.headers.get(H_SOURCE) == self.bridge_id:
            self.counters.inc("loop.skipped")
            await inbound.ack()
            return None
        if self.rpc is not None and self.rpc.take_reply(self.endpoint, envelope):
            await inbound.ack()
            return None
        matches = [(r, v) for r in self.routes if (v := r.match(envelope)) is not None]
        if len(matches) == 1 and lane is not None:
            sent = await self._send(inbound, lane, *matches[0])
            if sent is not None:
                return sent
            if lane.pending:
                # The one-by-one path: nothing may overtake what the lane has in flight.
                await self._settle(lane, wait_all=True)
        elif lane is not None and lane.pending:
            await self._settle(lane, wait_all=True)
        matched = False
        settle = True
        error: RejectedMessage | None = None
        rpc: list[tuple[ToRoomRoute, dict[str, str]]] = []
        ticket: _Ticket | None = None  # made when a rate limit holds the message
        for route, values in matches:
            matched = True
            self.counters.inc(f"route.{route.name}.received")
            if route.rules is not None and route.rules.where is not None:
                why_not = route.rules.filtered(values, envelope.headers, envelope.payload)
                if why_not is not None:
                    # Filtered out: settled (acknowledged) like a delivered message, counted.
                    self.counters.inc(f"route.{route.name}.filtered")
                    if why_not != "false":
                        self.counters.note_error(route.name, f"filtered: {why_not}")
                    continue
            if route.target.kind == "rpc":
                rpc.append((route, values))
                continue
            limiter = self.limits.get(route.name) if self.limits else None
            if limiter is not None:
                ticket = ticket or _Ticket(inbound)
                decision = limiter.admit(values, (route, envelope, values, ticket))
                if decision is Decision.HELD:
                    ticket.waiting += 1
                    continue
                if decision is Decision.DROPPED:
                    continue  # counted by the limiter; settled along this route
            ok, why = await self._deliver_guarded(route, envelope, values)
            settle = settle and ok
            error = error or why
        if not matched:
            self.counters.inc(f"source.{self.name}.unmatched")
        if ticket is not None and ticket.waiting:
            # A rate limit holds it along some route: acknowledged once that route settles it
            # (a request among them is answered without acknowledging it itself).
            if rpc:
                await self.rpc_submit(rpc[0][0], envelope, rpc[0][1], inbound, ack=False)
            await ticket.finish(settle, error, close=True)
            return None
        if rpc:
            # A request is answered once: by the first RPC route it matches. Its task
            # acknowledges it after the reply (and only if the other routes settled it).
            if len(rpc) > 1:
                self.counters.inc(f"source.{self.name}.rpc_extra_routes", len(rpc) - 1)
            route, values = rpc[0]
            await self.rpc_submit(route, envelope, values, inbound, ack=settle)
            return None
        if settle:
            await inbound.ack(error)
        return None

    async def _send(
        self, inbound: Inbound[Envelope], lane: _Lane, route: ToRoomRoute, values: dict[str, str]
    ) -> _Sent | None:
        """Queue the message as a pipelined packet (see the module docstring), or None.

        None (nothing sent, nothing counted) when it needs the one-by-one path: a request, a
        rate limit, a ``where:`` filter, an expiry, a delivery that is not a reliable packet
        into a connected room, or one the route refuses to build (decided there).
        """
        if route.target.kind == "rpc" or (
            route.rules is not None and route.rules.where is not None
        ):
            return None
        if (self.limits and route.name in self.limits) or inbound.message.expiry is not None:
            return None
        try:
            packet = route.delivery(inbound.message, values)
        except RejectedMessage:
            return None
        if lane.pending and lane.pending[-1].packet.room != packet.room:
            return None  # one room at a time: a rejoin elsewhere must not reorder the lane
        delivery = await self.room_sink.send(route.name, packet, inbound.message, route.rules)
        if delivery is None:
            return None
        self.counters.inc(f"route.{route.name}.received")
        return _Sent(inbound, route, values, packet, delivery)

    async def rpc_submit(
        self,
        route: ToRoomRoute,
        envelope: Envelope,
        values: dict[str, str],
        inbound: Inbound[Envelope],
        *,
        ack: bool,
    ) -> None:
        """Hand a request to the RPC bridge (configured whenever a route has an rpc target)."""
        assert self.rpc is not None
        await self.rpc.submit(route, envelope, values, inbound, ack=ack)

    async def _deliver_guarded(
        self, route: ToRoomRoute, envelope: Envelope, values: dict[str, str]
    ) -> tuple[bool, RejectedMessage | None]:
        """`_deliver`; an exception that escapes it is a bug, decided as ``internal_error``."""
        try:
            return await self._deliver(route, envelope, values)
        except Exception as exc:
            log.error("%s: delivery failed unexpectedly", route.name, exc_info=exc)
            return await self.rejections.decide(
                route.name,
                route.on_reject,
                route.dead_letter,
                RejectedMessage("internal_error", f"{type(exc).__name__}: {exc}"),
                _rejected(envelope, values),
            )

    async def _deliver(
        self, route: ToRoomRoute, envelope: Envelope, values: dict[str, str]
    ) -> tuple[bool, RejectedMessage | None]:
        """Deliver along one route: (settle, nack error) as `Rejections.decide` returns."""
        prefix = f"route.{route.name}"
        # The MQTT 5 expiry is the interval left when the broker sent it, from reception on.
        if envelope.expiry is not None and time.time() > envelope.received_at + envelope.expiry:
            self.counters.inc(f"{prefix}.expired")
            return True, None
        try:
            delivery = route.delivery(envelope, values)
            await self.room_sink.deliver(route.name, delivery, envelope, route.rules)
        except RejectedMessage as why:
            return await self.rejections.decide(
                route.name, route.on_reject, route.dead_letter, why, _rejected(envelope, values)
            )
        self.counters.inc(f"{prefix}.delivered")
        return True, None


def _rejected(envelope: Envelope, values: dict[str, str]) -> Rejected:
    return Rejected(
        envelope.payload,
        values,
        dict(envelope.headers),
        envelope.content_type,
        None,
        envelope.topic,
    )
