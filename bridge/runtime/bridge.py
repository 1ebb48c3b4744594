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

Shutdown (the first signal; a second one forces, see `bridge.cli`), within
``bridge.shutdown_timeout``: stop reading the buses and let the deliveries in progress finish,
let bus requests get their replies, leave the rooms (with `leave`), publish what the room-to-bus
routes still hold (a spool keeps what is left for the next start; without one it is counted as
``shutdown.undelivered``), then exit the endpoints (flush, commit, close).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from bridge.config import Config
from bridge.endpoint import Endpoint, Sink, Source
from bridge.envelope import Envelope, Outbound
from bridge.errors import ConnectorError
from bridge.retry import CONNECT_MAX, delay
from bridge.room.errors import RoomError
from bridge.room.server_api import ServerApi, mint_token
from bridge.room.types import Counters
from bridge.router import ToBusRoute, ToRoomRoute, compile_routes
from bridge.rpcbridge import RpcBridge
from bridge.runtime.dead_letter import Rejections
from bridge.runtime.outbox import DurableQueue, OutboundCodec, Outbox
from bridge.runtime.publisher import Publisher
from bridge.runtime.pump import BusPump
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
    ) -> None:
        self.config = config
        self.endpoints = endpoints
        self.bridge_id = bridge_id or f"{config.livekit.identity}-{uuid.uuid4().hex[:8]}"
        self.counters = Counters()
        self.spooling = spooling
        lk = config.livekit
        self.server_api = (
            ServerApi(lk.url, lk.api_key, lk.api_secret) if lk.api_key and lk.api_secret else None
        )
        self.publisher = Publisher(self.counters)
        self.rejections = Rejections(endpoints.sinks, self.publisher, self.counters, self.bridge_id)
        routes = compile_routes(config)
        settings = config.bridge
        self.outboxes = [
            Outbox(
                r,
                endpoints.sinks[r.target.endpoint],
                self.publisher,
                self.rejections,
                self.counters,
                bridge_id=self.bridge_id,
                queue_size=settings.queue_size,
                overflow=settings.overflow,
                window=settings.publish_window,
                spool=spooling.route(r.name, settings.overflow) if spooling else None,
                codec=spooling.codec if spooling else None,
            )
            for r in routes
            if isinstance(r, ToBusRoute) and r.kind != "rpc"
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
        self.room_sink = RoomSink(self.links, self.server_api)
        self.pumps = [
            BusPump(
                s.name,
                s.source,
                s.routes,
                endpoint=s.endpoint,
                room_sink=self.room_sink,
                rejections=self.rejections,
                rpc=self.rpc,
                counters=self.counters,
                bridge_id=self.bridge_id,
                max_in_flight=settings.max_in_flight,
            )
            for s in endpoints.sources
        ]
        self.ready = asyncio.Event()
        self.tasks: dict[str, str] = {}  # task name -> "running", "restarting: <error>", ...
        self._tg: asyncio.TaskGroup | None = None
        self._room_tasks: dict[str, asyncio.Task[None]] = {}
        self._pump_tasks: list[asyncio.Task[None]] = []
        self._other_tasks: list[asyncio.Task[None]] = []
        self._entered: list[Endpoint] = []

    # --------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain and shut down.

        Raises:
            ConnectorError: an endpoint refused the bridge for good at start (not retriable).
        """
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.push_async_callback(self._close_late_entered)
                late: list[Endpoint] = []
                for endpoint in self.endpoints.ordered():
                    if not await self._enter(stack, endpoint):
                        late.append(endpoint)
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    for endpoint in late:
                        retry = functools.partial(self._enter_later, endpoint)
                        self._spawn(f"enter:{endpoint.name}", retry)
                    for outbox in self.outboxes:
                        self._spawn(f"outbox:{outbox.name}", outbox.run)
                    for pump in self.pumps:
                        self._pump_tasks.append(self._spawn(f"pump:{pump.name}", pump.run))
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
                    await self._drain()
                    for task in (*self._other_tasks, *self._room_tasks.values()):
                        task.cancel()
        finally:
            self._tg = None
            await self.rpc.stop()
            if self.server_api is not None:
                await self.server_api.aclose()
            if self.spooling is not None:
                self.spooling.close()
            log.info("bridge %s: stopped", self.bridge_id)

    async def _enter(self, stack: contextlib.AsyncExitStack, endpoint: Endpoint) -> bool:
        """Enter `endpoint`; False when it is unreachable for now (retried in the background)."""
        try:
            await stack.enter_async_context(endpoint)
        except ConnectorError as exc:
            if not exc.retriable:
                raise
            log.warning(
                "%s: unreachable at start (%s); retrying in the background", endpoint.name, exc
            )
            return False
        return True

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
            self._entered.append(endpoint)
            log.info("%s: connected", endpoint.name)
            return

    async def _close_late_entered(self) -> None:
        for endpoint in reversed(self._entered):
            with contextlib.suppress(Exception):
                await endpoint.__aexit__(None, None, None)

    async def _drain(self) -> None:
        timeout = self.config.bridge.shutdown_timeout
        deadline = time.monotonic() + timeout
        # 1. Stop reading the buses; deliveries in progress finish (or stay unacknowledged).
        for pump in self.pumps:
            pump.stop_reading()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.gather(*self._pump_tasks, return_exceptions=True)
        for task in self._pump_tasks:
            task.cancel()
        await asyncio.gather(*self._pump_tasks, return_exceptions=True)
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

    # --------------------------------------------------------------- supervision

    def _spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        assert self._tg is not None
        task = self._tg.create_task(self._supervise(name, run), name=f"roombus[{name}]")
        if not name.startswith(("pump:", "room:")):
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
        rooms = sorted(n for n, link in self.links.items() if not link.connected.is_set())
        endpoints = sorted(
            {e.name for e in self.endpoints.ordered() if not getattr(e, "connected", True)}
        )
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
        return mint_token(
            lk.api_key,
            lk.api_secret,
            identity=lk.identity,
            room=room,
            name=lk.name,
            metadata=lk.metadata,
            attributes=lk.attributes,
            ttl=timedelta(seconds=lk.token_ttl),
        )

    def _join(self, name: str) -> None:
        if name in self.links:
            return
        link = RoomLink(name, self.config.livekit.url, self._token, self.counters)
        events = RoomEvents(link, self.outboxes, self.counters)
        link.add_listeners(attach=(events.attach, self.rpc.attach), joined=(events.joined,))
        self.links[name] = link
        self._room_tasks[name] = self._spawn(f"room:{name}", link.run)

    async def _discover_rooms(self) -> None:
        lk = self.config.livekit
        assert self.server_api is not None
        failing = False
        while True:
            try:
                for room in await self.server_api.list_rooms():
                    if any(glob_match(p, room.name) for p in lk.room_patterns):
                        self._join(room.name)
                failing = False
            except RoomError as exc:
                self.counters.inc("rooms.discovery_failed")
                if not failing:
                    log.warning("room discovery failed: %s", exc)
                failing = True
            await asyncio.sleep(lk.room_discovery_interval)


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, for a one-line status."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
