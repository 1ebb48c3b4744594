"""The Bridge: owns every endpoint and every long-lived task, and shuts down in order.

Ownership, in two statements (aiomqtt, uvicorn): the endpoints are entered on one
`AsyncExitStack` — sinks first, so nothing is read before it can go out — and every long-lived
task runs in one `asyncio.TaskGroup`: one `RoomLink` per room, one `Outbox` per room-to-bus
route, one `BusPump` per bus source, room discovery, and the stop watcher.

Degraded, not dead: an endpoint that cannot reach its far side does not stop the bridge (the
endpoints keep reconnecting by themselves; one whose ``__aenter__`` raised a retriable error is
entered again in the background). Only what no retry can fix (bad credentials, TLS
verification) ends the run at start. `readiness` tells exactly what is down: rooms not joined,
endpoints not connected, tasks not running.

Supervision: a task that crashes is logged with its traceback, counted
(``tasks.crashed.<task>``), reported by `readiness` and restarted with capped, jittered
backoff — never silent.

Reload (`Bridge.reload`, planned by `bridge.runtime.reload`): connector by connector, under a
lock that shutdown also takes; untouched routes, their rooms and their queues are not
disturbed.

Shutdown (the first signal; a second one forces, see `bridge.cli`), within
``bridge.shutdown_timeout``: stop reading the buses and let the deliveries in progress finish,
let bus requests get their replies, leave the rooms (with `leave`), publish what the room-to-bus
routes still hold (a spool keeps what is left for the next start; without one it is counted as
``shutdown.undelivered``), then exit the endpoints (flush, commit, close).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from bridge.config import Config
from bridge.endpoint import Endpoint, Sink, Source, Subscriber
from bridge.envelope import Envelope, Outbound
from bridge.errors import ConnectorError
from bridge.retry import CONNECT_MAX, delay
from bridge.room.e2ee import DataCryptor
from bridge.room.errors import RoomError
from bridge.room.server_api import ServerApi, mint_token
from bridge.room.types import Counters
from bridge.router import ToBusRoute, ToRoomRoute, compile_routes
from bridge.rpcbridge import RpcBridge
from bridge.runtime.dead_letter import Rejections
from bridge.runtime.grants import needed_grants
from bridge.runtime.latch import Latch
from bridge.runtime.outbox import DurableQueue, OutboundCodec, Outbox
from bridge.runtime.ownership import (
    Membership,
    Ownership,
    TrackedDeliveries,
    replica_name,
    room_identity,
)
from bridge.runtime.publisher import Publisher
from bridge.runtime.pump import BusPump
from bridge.runtime.ratelimit import RateSpec, rate_specs
from bridge.runtime.reload import ReloadPlan, ReloadRefused, plan_reload
from bridge.runtime.room_events import RoomEvents
from bridge.runtime.room_link import RoomLink
from bridge.runtime.room_sink import RoomSink
from bridge.topics import glob_match

log = logging.getLogger("roombus.bridge")

SPOOL_EXPIRY_INTERVAL = 5.0


@dataclass(frozen=True)
class BusSource:
    """A bus source and what it feeds.

    Attributes:
        name: For logs, metrics and task names (``mqtt:plant``, ``kafka:main:orders-in``).
        endpoint: The bus endpoint it reads, as `BusTarget.endpoint` names it (``mqtt:plant``):
            replies to room-to-bus RPC calls are matched by it.
        source: The source.
        routes: The bus-to-room routes its messages are matched against.
    """

    name: str
    endpoint: str
    source: Source[Envelope]
    routes: tuple[ToRoomRoute, ...] = ()
    # MQTT topic filters (with QoS) the source subscribes to for `routes`; a reload that
    # keeps the connection subscribes and unsubscribes the difference.
    subscriptions: Mapping[str, int] = field(default_factory=dict)


@dataclass
class Endpoints:
    """Every endpoint the configuration uses, built by the composition root (`bridge.app`)."""

    sinks: dict[str, Sink[Outbound]] = field(default_factory=dict)  # by endpoint name
    sources: list[BusSource] = field(default_factory=list)

    def ordered(self) -> list[Endpoint]:
        """Every endpoint once, sinks first (nothing is read before it can go out)."""
        seen: dict[int, Endpoint] = {}
        for endpoint in (*self.sinks.values(), *(s.source for s in self.sources)):
            seen.setdefault(id(endpoint), endpoint)
        return list(seen.values())


@dataclass(frozen=True)
class Spooling:
    """A route spool factory and the codec of what it holds (from `bridge.spool`)."""

    route: Callable[[str, str], DurableQueue]  # (route name, overflow) -> its spool
    codec: OutboundCodec
    expire: Callable[[], int]  # forget what is older than max_age; how many
    close: Callable[[], None]


class Bridge:
    """The running bridge (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        endpoints: Endpoints,
        *,
        bridge_id: str | None = None,
        spooling: Spooling | None = None,
        plan_endpoints: Callable[[Config], Endpoints] | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.config = config
        self.endpoints = endpoints
        # The composition root's endpoint planner: what a reloaded configuration needs
        # (nothing connects before the bridge enters what it does not have yet).
        self.plan_endpoints = plan_endpoints
        # Fixed for the run: a reload that needs more is refused (bridge.runtime.reload).
        self.grants = needed_grants(config)
        self.bridge_id = bridge_id or f"{config.livekit.identity}-{uuid.uuid4().hex[:8]}"
        self.counters = Counters()
        self.spooling = spooling
        lk = config.livekit
        self.server_api = (
            ServerApi(lk.url, lk.api_key, lk.api_secret) if lk.api_key and lk.api_secret else None
        )
        # Derived once (PBKDF2 takes a while) and shared by every room's sessions.
        self.e2ee = (
            DataCryptor(
                lk.e2ee.key(),
                ratchet_salt=lk.e2ee.ratchet_salt.encode("utf-8"),
                key_derivation=lk.e2ee.key_derivation,
            )
            if lk.e2ee is not None
            else None
        )
        self.publisher = Publisher(self.counters)
        self._rate_specs = rate_specs(config.connectors)  # by route; again on every reload
        self.rejections = Rejections(endpoints.sinks, self.publisher, self.counters, self.bridge_id)
        routes = compile_routes(config)
        settings = config.bridge
        self.outboxes = [
            self._outbox(r) for r in routes if isinstance(r, ToBusRoute) and r.kind != "rpc"
        ]
        to_room = [r for r in routes if isinstance(r, ToRoomRoute)]
        self.links: dict[str, RoomLink] = {}
        self.rpc = RpcBridge(
            [r for r in to_room if r.target.kind == "rpc"],
            [r for r in routes if isinstance(r, ToBusRoute) and r.kind == "rpc"],
            rooms=self.links,
            sinks=endpoints.sinks,
            rejections=self.rejections,
            counters=self.counters,
            settings=settings,
            bridge_id=self.bridge_id,
            mqtt5={name: broker.protocol == "5" for name, broker in config.mqtt.items()},
        )
        self.latch = Latch(config.connectors, self.counters)  # values for late joiners
        self.room_sink = RoomSink(self.links, self.server_api, self.latch)
        # Replicas (`bridge.runtime.ownership`): the rooms this replica owns, by the group's
        # assignment; the deliveries are tracked per room so a released room drains first.
        self.membership = membership
        self.ownership: Ownership | None = None
        self._tracked: TrackedDeliveries | None = None
        self._room_filters: dict[str, list[tuple[Subscriber, str]]] = {}  # by room
        self._filter_users: dict[tuple[int, str], int] = {}  # (source id, filter) -> rooms
        replicas = config.bridge.replicas
        if replicas is not None and membership is not None:
            self.replica = replica_name(replicas.replica_id)
            self._tracked = TrackedDeliveries(self.room_sink, self.counters)
            self.ownership = Ownership(
                self.replica,
                self.counters,
                acquire=self._acquire,
                release=self._release,
                present=self._owner_present if self.server_api is not None else None,
                prepare=self._prepare,
                handover_timeout=replicas.handover_timeout,
                handover_overlap=replicas.effective_overlap(settings.shutdown_timeout),
                evicted_backoff=replicas.evicted_backoff,
                deliveries=self._tracked,
            )
        self.pumps = [self._pump(s) for s in endpoints.sources]
        self.ready = asyncio.Event()
        self.tasks: dict[str, str] = {}  # task name -> "running", "restarting: <error>", ...
        self._tg: asyncio.TaskGroup | None = None
        self._events: dict[str, RoomEvents] = {}  # by room
        self._room_tasks: dict[str, asyncio.Task[None]] = {}
        self._pump_tasks: dict[str, asyncio.Task[None]] = {}  # by pump name
        self._outbox_tasks: dict[str, asyncio.Task[None]] = {}  # by route name
        self._enter_tasks: dict[str, asyncio.Task[None]] = {}  # by endpoint name
        self._other_tasks: list[asyncio.Task[None]] = []
        self._open: list[Endpoint] = []  # entered, in order; exited in reverse
        self._reload_lock = asyncio.Lock()
        self.last_reload: dict[str, object] = {}  # set by `bridge.runtime.reloader`

    def _outbox(self, route: ToBusRoute) -> Outbox:
        settings, spooling = self.config.bridge, self.spooling
        return Outbox(
            route,
            self.endpoints.sinks[route.target.endpoint],
            self.publisher,
            self.rejections,
            self.counters,
            bridge_id=self.bridge_id,
            queue_size=settings.queue_size,
            overflow=settings.overflow,
            window=settings.publish_window,
            spool=spooling.route(route.name, settings.overflow) if spooling else None,
            codec=spooling.codec if spooling else None,
            rate=self._rate_specs.get(route.name),
        )

    def _pump(self, source: BusSource) -> BusPump:
        return BusPump(
            source.name,
            source.source,
            source.routes,
            endpoint=source.endpoint,
            room_sink=self._tracked or self.room_sink,
            rejections=self.rejections,
            rpc=self.rpc,
            counters=self.counters,
            bridge_id=self.bridge_id,
            max_in_flight=self.config.bridge.max_in_flight,
            rates=self._rates_of(source.routes),
        )

    def _rates_of(self, routes: Iterable[ToRoomRoute]) -> dict[str, RateSpec]:
        return {r.name: self._rate_specs[r.name] for r in routes if r.name in self._rate_specs}

    # --------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain and shut down.

        Raises:
            ConnectorError: an endpoint refused the bridge for good at start (not retriable).
        """
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.push_async_callback(self._close_endpoints)
                late = [e for e in self.endpoints.ordered() if not await self._enter(e)]
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    for endpoint in late:
                        self._enter_in_background(endpoint)
                    for outbox in self.outboxes:
                        self._start_outbox(outbox)
                    for pump in self.pumps:
                        self._start_pump(pump)
                    if self.ownership is not None:
                        assert self.membership is not None
                        await self.ownership.add_rooms(self.config.livekit.rooms)
                        run_membership = functools.partial(self.membership.run, self.ownership)
                        self._spawn(f"replicas:{self.membership.name}", run_membership)
                    else:
                        for name in self.config.livekit.rooms:
                            self._join(name)
                    if self.config.livekit.room_patterns:
                        self._spawn("rooms:discovery", self._discover_rooms)
                    if self.spooling is not None:
                        self._spawn("spool:expiry", self._expire_spool)
                    self.ready.set()
                    log.info(
                        "bridge %s: running: %d rooms, %d room-to-bus and %d bus sources",
                        self.bridge_id,
                        len(self.config.livekit.rooms),
                        len(self.outboxes),
                        len(self.pumps),
                    )
                    await stop.wait()
                    async with self._reload_lock:  # a reload in progress finishes first
                        if self.ownership is not None and self.membership is not None:
                            # Leave the group (the others take the rooms and subscribe), keep
                            # delivering for the overlap, then hand the rooms over drained: the
                            # new owners join after that (docs/scaling.md).
                            await self.ownership.stop(leave=self.membership.leave)
                        await self._drain()
                    for task in (
                        *self._other_tasks,
                        *self._room_tasks.values(),
                        *self._outbox_tasks.values(),
                        *self._enter_tasks.values(),
                    ):
                        task.cancel()
        finally:
            self._tg = None
            await self.rpc.stop()
            if self.server_api is not None:
                await self.server_api.aclose()
            if self.spooling is not None:
                self.spooling.close()
            log.info("bridge %s: stopped", self.bridge_id)

    async def _enter(self, endpoint: Endpoint) -> bool:
        """Enter `endpoint`; False when it is unreachable for now (retried in the background)."""
        try:
            await endpoint.__aenter__()
        except ConnectorError as exc:
            if not exc.retriable:
                raise
            log.warning(
                "%s: unreachable at start (%s); retrying in the background", endpoint.name, exc
            )
            return False
        self._open.append(endpoint)
        return True

    def _enter_in_background(self, endpoint: Endpoint) -> None:
        retry = functools.partial(self._enter_later, endpoint)
        self._enter_tasks[endpoint.name] = self._spawn(f"enter:{endpoint.name}", retry)

    async def _enter_later(self, endpoint: Endpoint) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(delay(attempt, 0.5, CONNECT_MAX))
            attempt += 1
            try:
                await endpoint.__aenter__()
            except ConnectorError as exc:
                if not exc.retriable:
                    raise
                continue
            self._open.append(endpoint)
            self._enter_tasks.pop(endpoint.name, None)
            log.info("%s: connected", endpoint.name)
            return

    async def _exit(self, endpoint: Endpoint) -> None:
        """Exit `endpoint` (or stop trying to enter it); errors are logged, not raised."""
        task = self._enter_tasks.pop(endpoint.name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if endpoint not in self._open:
            return
        self._open.remove(endpoint)
        try:
            await endpoint.__aexit__(None, None, None)
        except Exception as exc:
            log.warning("%s: error while closing: %s", endpoint.name, exc, exc_info=exc)

    async def _close_endpoints(self) -> None:
        for endpoint in reversed(list(self._open)):
            await self._exit(endpoint)

    def _start_outbox(self, outbox: Outbox) -> None:
        self._outbox_tasks[outbox.name] = self._spawn(f"outbox:{outbox.name}", outbox.run)

    def _start_pump(self, pump: BusPump) -> None:
        self._pump_tasks[pump.name] = self._spawn(f"pump:{pump.name}", pump.run)

    async def _drain(self) -> None:
        timeout = self.config.bridge.shutdown_timeout
        deadline = time.monotonic() + timeout
        # 1. Stop reading the buses; deliveries in progress finish (or stay unacknowledged).
        for pump in self.pumps:
            pump.stop_reading()
        pumps = list(self._pump_tasks.values())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.gather(*pumps, return_exceptions=True)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        # Bus requests in progress get their replies (unanswered ones stay unacknowledged).
        await self.rpc.drain(max(0.0, deadline - time.monotonic()))
        # 2. Leave the rooms: no more room events.
        await asyncio.gather(*(link.stop() for link in self.links.values()), return_exceptions=True)
        # 3. Publish what the room-to-bus routes still hold, within the deadline.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.gather(*(o.drain() for o in self.outboxes))
        left = sum(o.depth + o.in_flight for o in self.outboxes)
        if left and self.spooling is None:
            self.counters.inc("shutdown.undelivered", left)
            log.error(
                "bridge: %d room-to-bus messages not delivered within %.0f s of shutdown",
                left,
                timeout,
            )
        elif left:
            log.warning(
                "bridge: %d room-to-bus messages stay in the spool for the next start", left
            )

    async def _expire_spool(self) -> None:
        assert self.spooling is not None
        while True:
            await asyncio.sleep(SPOOL_EXPIRY_INTERVAL)
            expired = self.spooling.expire()
            if expired:
                self.counters.inc("spool.expired", expired)
                log.warning("spool: %d messages older than spool.max_age expired", expired)

    # --------------------------------------------------------------- reload

    async def reload(self, new: Config) -> ReloadPlan:
        """Run on `new` from now on, connector by connector (`bridge.runtime.reload`).

        Unchanged connectors keep running untouched: their rooms are not rejoined and their
        queues keep their messages. Removed ones drain and stop, added ones start, changed
        ones drain and start again.

        Raises:
            ReloadRefused: `new` needs a restart (every reason listed), or the bridge is not
                running; the old configuration keeps running.
        """
        async with self._reload_lock:
            if self._tg is None or self.plan_endpoints is None:
                raise ReloadRefused(["the bridge is not running (or cannot reload)"])
            if self.ownership is not None:
                raise ReloadRefused(["bridge.replicas: restart the replicas one by one instead"])
            plan = plan_reload(self.config, new, self.grants)
            if plan.needs_restart:
                raise ReloadRefused(list(plan.needs_restart))
            if not plan.empty:
                await self._apply(plan, new, self.plan_endpoints(new))
            return plan

    async def _apply(self, plan: ReloadPlan, new: Config, planned: Endpoints) -> None:
        gone = {*plan.removed, *plan.changed}
        # 1. What goes: room-to-bus routes are no longer offered anything and drain what they
        #    hold; bus sources that feed only routes that go (or change) stop reading, finish
        #    their deliveries and close (their position is committed).
        leaving = [o for o in self.outboxes if o.name in gone]
        self.outboxes = [o for o in self.outboxes if o.name not in gone]
        for events in self._events.values():
            events.set_routes(self.outboxes)
        await self._stop_outboxes(leaving)
        wanted = {s.name: s for s in planned.sources}
        for current in list(self.endpoints.sources):
            later = wanted.get(current.name)
            if later is not None and isinstance(current.source, Subscriber):
                wanted[current.name] = self._resubscribe(current, later)
            elif later is None or {r.name for r in current.routes} & gone:
                await self._stop_source(current)
            else:
                wanted[current.name] = current  # the same source, untouched
        # 2. Sinks first: nothing starts before what it publishes to is there.
        for name, sink in planned.sinks.items():
            if name not in self.endpoints.sinks:
                self.endpoints.sinks[name] = sink
                if not await self._enter(sink):
                    self._enter_in_background(sink)
        self.config = new
        self._rate_specs = rate_specs(new.connectors)
        self.latch.configure(new.connectors)
        for pump in self.pumps:
            pump.set_rates(self._rates_of(pump.routes))  # kept MQTT connections: changed limits
        # 3. What comes.
        for route in compile_routes(new):
            if route.name in {*plan.added, *plan.changed} and isinstance(route, ToBusRoute):
                outbox = self._outbox(route)
                self.outboxes.append(outbox)
                self._start_outbox(outbox)
        for events in self._events.values():
            events.set_routes(self.outboxes)
        running = {s.name for s in self.endpoints.sources}
        for name, source in wanted.items():
            if name in running:
                continue
            self.endpoints.sources.append(source)
            if not await self._enter(source.source):
                self._enter_in_background(source.source)
            pump = self._pump(source)
            self.pumps.append(pump)
            self._start_pump(pump)
        # 4. Sinks no route uses any more (their routes have drained).
        for name in [n for n in self.endpoints.sinks if n not in planned.sinks]:
            await self._exit(self.endpoints.sinks.pop(name))
        # 5. Rooms.
        for room in plan.rooms_joined:
            self._join(room)
        for room in plan.rooms_left:
            await self._leave(room)

    async def _stop_outboxes(self, outboxes: list[Outbox]) -> None:
        """Publish what `outboxes` hold (within the shutdown timeout), then stop them."""
        if not outboxes:
            return
        timeout = self.config.bridge.shutdown_timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(o.drain() for o in outboxes))
        for outbox in outboxes:
            task = self._outbox_tasks.pop(outbox.name, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            left = outbox.depth + outbox.in_flight
            if left and self.spooling is None:
                self.counters.inc(f"route.{outbox.name}.dropped.reload", left)
                log.error(
                    "reload: route %s: %d messages not delivered within %.0f s",
                    outbox.name,
                    left,
                    timeout,
                )

    async def _stop_source(self, current: BusSource) -> None:
        """Stop reading `current`, let its deliveries finish, close it."""
        pump = next(p for p in self.pumps if p.name == current.name)
        pump.stop_reading()
        task = self._pump_tasks.pop(pump.name, None)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.bridge.shutdown_timeout):
                    await asyncio.gather(task, return_exceptions=True)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.pumps.remove(pump)
        self.endpoints.sources.remove(current)
        if all(s.source is not current.source for s in self.endpoints.sources):
            await self._exit(current.source)

    def _resubscribe(self, current: BusSource, later: BusSource) -> BusSource:
        """Keep `current`'s connection; take `later`'s routes and topic filters."""
        source = current.source
        assert isinstance(source, Subscriber)
        for topic_filter, qos in later.subscriptions.items():
            if current.subscriptions.get(topic_filter) != qos:
                source.add_subscription(topic_filter, qos)
        pump = next(p for p in self.pumps if p.name == current.name)
        pump.routes = list(later.routes)
        for topic_filter in current.subscriptions:
            if topic_filter not in later.subscriptions:
                source.remove_subscription(topic_filter)
        kept = dataclasses.replace(current, routes=later.routes, subscriptions=later.subscriptions)
        self.endpoints.sources[self.endpoints.sources.index(current)] = kept
        return kept

    async def _leave(self, room: str) -> None:
        link = self.links.pop(room, None)
        self._events.pop(room, None)
        task = self._room_tasks.pop(room, None)
        if link is not None:
            await link.stop()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --------------------------------------------------------------- supervision

    def _spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        assert self._tg is not None
        task = self._tg.create_task(self._supervise(name, run), name=f"roombus[{name}]")
        if not name.startswith(("pump:", "room:", "outbox:", "enter:")):
            self._other_tasks.append(task)
        return task

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run`; restart it with backoff whenever it crashes (see the module docstring)."""
        attempt = 0
        while True:
            self.tasks[name] = "running"
            started = time.monotonic()
            try:
                await run()
            except asyncio.CancelledError:
                self.tasks.pop(name, None)
                raise
            except Exception as exc:
                if time.monotonic() - started > 60:
                    attempt = 0
                self.counters.inc(f"tasks.crashed.{name}")
                cause = _first_leaf(exc)
                self.tasks[name] = f"crashed: {type(cause).__name__}: {cause}"
                log.error("bridge: task %s crashed; restarting it", name, exc_info=exc)
                await asyncio.sleep(delay(attempt, 0.5, CONNECT_MAX))
                attempt += 1
                continue
            self.tasks.pop(name, None)
            return

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether the bridge does all its work, and what is down if not."""
        # A room waiting for its previous owner to leave (replicas) is not joining yet.
        rooms = sorted(
            n
            for n, link in self.links.items()
            if not link.connected.is_set() and n in self._room_tasks
        )
        endpoints = sorted(
            {e.name for e in self.endpoints.ordered() if not getattr(e, "connected", True)}
        )
        if self.membership is not None and not getattr(self.membership, "connected", True):
            endpoints = sorted({*endpoints, self.membership.name})
        tasks = {n: s for n, s in sorted(self.tasks.items()) if s != "running"}
        ready = self.ready.is_set() and not rooms and not endpoints and not tasks
        return ready, {
            "ready": ready,
            "rooms_not_connected": rooms,
            "endpoints_not_connected": endpoints,
            "tasks_not_running": tasks,
        }

    # --------------------------------------------------------------- rooms

    def _token(self, room: str) -> str:
        lk = self.config.livekit
        if lk.token is not None:
            return lk.token
        assert lk.api_key is not None and lk.api_secret is not None
        grants = self.grants
        identity, attributes = lk.identity, lk.attributes
        replicas = self.config.bridge.replicas
        if self.ownership is not None and replicas is not None:
            identity = room_identity(replicas.identity, lk.identity, room)
            attributes = {**lk.attributes, "roombus.replica": self.ownership.replica}
        return mint_token(
            lk.api_key,
            lk.api_secret,
            identity=identity,
            room=room,
            name=lk.name,
            metadata=lk.metadata,
            attributes=attributes,
            ttl=timedelta(seconds=lk.token_ttl),
            can_publish=False,
            can_publish_data=grants.can_publish_data,
            can_update_own_metadata=grants.can_update_own_metadata,
            can_subscribe=grants.can_subscribe,
        )

    def _join(self, name: str) -> None:
        self._link(name)
        if name not in self._room_tasks:
            self._room_tasks[name] = self._spawn(f"room:{name}", self.links[name].run)

    def _link(self, name: str) -> None:
        """The room's link, not joined yet: deliveries into it wait for the join."""
        if name in self.links:
            return
        lk = self.config.livekit
        link = RoomLink(
            name,
            lk.url,
            self._token,
            self.counters,
            renew_token=lk.token is None,
            single_peer_connection=lk.single_peer_connection,
            turn_ca_file=lk.turn_ca_file,
            e2ee=self.e2ee,
            evicted=self.ownership.evicted if self.ownership is not None else None,
        )
        events = RoomEvents(link, self.outboxes, self.counters)
        link.add_listeners(
            attach=(events.attach, self.rpc.attach, self.latch.attach), joined=(events.joined,)
        )
        self.links[name] = link
        self._events[name] = events

    async def _discover_rooms(self) -> None:
        lk = self.config.livekit
        assert self.server_api is not None
        failing = False
        while True:
            try:
                found = [
                    room.name
                    for room in await self.server_api.list_rooms()
                    if any(glob_match(p, room.name) for p in lk.room_patterns)
                ]
                if self.ownership is not None:
                    await self.ownership.add_rooms(found)
                else:
                    for name in found:
                        self._join(name)
                failing = False
            except RoomError as exc:
                self.counters.inc("rooms.discovery_failed")
                if not failing:
                    log.warning("room discovery failed: %s", exc)
                failing = True
            await asyncio.sleep(lk.room_discovery_interval)

    # --------------------------------------------------------------- replicas

    async def _prepare(self, room: str) -> None:
        """This replica owns `room` now: subscribe to its bus topics, set up its link.

        Before the previous owner left: what arrives meanwhile waits for the join.
        """
        filters = self._room_filters.setdefault(room, [])
        for source in self.endpoints.sources:
            subscriber = source.source
            if not isinstance(subscriber, Subscriber):
                continue
            for route in source.routes:
                flt, qos = route.filter, getattr(route.source, "qos", 1)
                if flt is None:
                    continue
                values = route.target.room.match(room)
                if values is None:
                    continue  # the route never delivers into this room
                narrowed = flt.narrowed(values)
                if narrowed is None:
                    log.warning(
                        "replicas: route %s: cannot narrow %s to room %s; subscribing to all of"
                        " it (deliveries into rooms owned elsewhere are rejected)",
                        route.name,
                        flt.source,
                        room,
                    )
                    narrowed = flt.mqtt_filter
                key = (id(subscriber), narrowed)
                self._filter_users[key] = self._filter_users.get(key, 0) + 1
                if self._filter_users[key] == 1:
                    subscriber.add_subscription(narrowed, qos)
                filters.append((subscriber, narrowed))
        self._link(room)

    async def _acquire(self, room: str) -> None:
        """Join `room` (after `_prepare` and the handover wait)."""
        self._join(room)
        link = self.links.get(room)
        if link is not None:
            await link.connected.wait()

    async def _release(self, room: str) -> None:
        """Give `room` up drained: unsubscribe, let its deliveries finish, leave, flush."""
        for subscriber, narrowed in self._room_filters.pop(room, []):
            key = (id(subscriber), narrowed)
            self._filter_users[key] -= 1
            if not self._filter_users[key]:
                del self._filter_users[key]
                subscriber.remove_subscription(narrowed)
        timeout = self.config.bridge.shutdown_timeout
        if self._tracked is not None and not await self._tracked.quiet(room, 0.5, timeout):
            self.counters.inc("ownership.release_undrained")
            log.warning("replicas: room %s: deliveries still in progress at release", room)
        await self._leave(room)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(o.drain() for o in self.outboxes))

    async def _owner_present(self, room: str) -> bool:
        """Whether the room's bridge identity (a previous owner) is in `room` now."""
        assert self.server_api is not None and self.config.bridge.replicas is not None
        identity = room_identity(
            self.config.bridge.replicas.identity, self.config.livekit.identity, room
        )
        participants = await self.server_api.list_participants(room)
        return any(p.identity == identity for p in participants)


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, for a one-line status."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
