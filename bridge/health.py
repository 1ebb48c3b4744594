"""The bridge's HTTP port (aiohttp): probes, metrics, status, and a live status page.

* ``/ping``: 200 while the process serves (liveness).
* ``/ready``: 200 once the bridge runs and every room is joined, every endpoint connected and
  every task running; otherwise 503 with a JSON body saying exactly what is not.
* ``/metrics``: Prometheus text format, from the bridge's own registry (`bridge.metrics`).
* ``/status``: JSON for people and the status page: the readiness, per route its direction,
  totals, message rates over the last ~10 s, buffer depth and in-flight, last error; rooms with
  their participants; bus connections; recent errors; the raw counters; and with
  `bridge.replicas` what this replica owns (`Ownership.snapshot`).
* ``/``: the status page (``bridge/static/status.html``), which polls ``/status``.

Rates come from a ring of samples of the route totals, one per `SAMPLE_EVERY` seconds, taken by
a task that lives as long as the server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge import __version__
from bridge.metrics import ROOM_TO_BUS, BridgeMetrics

if TYPE_CHECKING:
    from bridge.runtime.bridge import Bridge

SAMPLE_EVERY = 1.0
RATE_WINDOW = 10  # samples kept: rates are over the last ~10 s


def _page() -> bytes:
    return resources.files("bridge").joinpath("static/status.html").read_bytes()


class HealthServer:
    """Serves the bridge's HTTP endpoints on `host`:`port`."""

    def __init__(self, bridge: Bridge, port: int, host: str = "127.0.0.1") -> None:
        self.bridge = bridge
        self.port = port
        self.host = host
        self.metrics = BridgeMetrics(bridge)
        self.started = time.time()
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._samples: collections.deque[tuple[float, dict[str, dict[str, int]]]] = (
            collections.deque(maxlen=RATE_WINDOW + 1)
        )
        self._page = _page()

    async def start(self) -> None:
        """Listen, and start sampling the route totals for rates."""
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port).start()
        self._runner = runner
        self._sampler = asyncio.create_task(self._sample_forever(), name="roombus[http.sampler]")

    async def stop(self) -> None:
        """Stop listening and sampling. Idempotent."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def status(self) -> tuple[int, dict[str, object]]:
        """The readiness status code and body."""
        ready, body = self.bridge.readiness()
        return (200 if ready else 503), body

    # ------------------------------------------------------------------ handlers

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _ready(self, request: web.Request) -> web.Response:
        code, body = self.status()
        return web.json_response(body, status=code)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.full_status(), headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ /status

    def full_status(self) -> dict[str, Any]:
        """The body of ``/status`` (see the module docstring)."""
        bridge = self.bridge
        _, body = bridge.readiness()
        now, totals = self._sample()
        routes = self.metrics.routes()
        outboxes = {o.name: o for o in bridge.outboxes}
        last_errors = bridge.counters.last_error
        out_routes: dict[str, Any] = {}
        for name, counts in sorted(totals.items()):
            direction, bus = routes.get(name, ("", ""))
            rates = self._rates(name, counts, now)
            through = "published" if direction == ROOM_TO_BUS else "delivered"
            entry: dict[str, Any] = {
                "direction": direction,
                "bus": bus,
                "counts": counts,
                "rate": rates.get(through, 0.0),
                "rates": rates,
                "last_error": _error(last_errors.get(name)),
            }
            outbox = outboxes.get(name)
            if outbox is not None:
                entry["depth"] = outbox.depth
                entry["in_flight"] = outbox.in_flight
            out_routes[name] = entry
        rooms: dict[str, Any] = {}
        for name, link in sorted(bridge.links.items()):
            room = link.room
            rooms[name] = {
                "connected": link.connected.is_set(),
                "participants": sorted(room.remote_identities()) if room is not None else [],
                "last_error": link.last_error,
            }
        connections: dict[str, Any] = {}
        for endpoint in bridge.endpoints.ordered():
            error = getattr(endpoint, "last_error", None)
            connections[endpoint.name] = {
                "connected": bool(getattr(endpoint, "connected", True)),
                "last_error": None if error is None else str(error),
            }
        body.update(
            bridge_id=bridge.bridge_id,
            version=__version__,
            time=time.time(),
            uptime=round(time.time() - self.started, 3),
            routes=out_routes,
            rooms=rooms,
            connections=connections,
            sources={p.name: {"in_flight": p.in_flight} for p in bridge.pumps},
            errors=[
                {"time": t, "route": subject, "message": message}
                for t, subject, message in reversed(bridge.counters.recent_errors)
            ],
            counters=dict(sorted(bridge.counters.items())),
            reload=bridge.last_reload or None,
            ownership=None if bridge.ownership is None else bridge.ownership.snapshot(),
        )
        return body

    def _sample(self) -> tuple[float, dict[str, dict[str, int]]]:
        return time.monotonic(), self.metrics.route_counts()

    def _rates(self, route: str, counts: dict[str, int], now: float) -> dict[str, float]:
        """Messages per second of each count since the oldest sample (at most ~10 s ago)."""
        if self._samples:
            then, old = self._samples[0]
            dt = now - then
            if dt >= SAMPLE_EVERY / 2:
                before = old.get(route, {})
                return {k: round(max(0, v - before.get(k, 0)) / dt, 3) for k, v in counts.items()}
        return dict.fromkeys(counts, 0.0)

    async def _sample_forever(self) -> None:
        while True:
            self._samples.append(self._sample())
            await asyncio.sleep(SAMPLE_EVERY)


def _error(error: tuple[float, str] | None) -> dict[str, Any] | None:
    return None if error is None else {"time": error[0], "message": error[1]}
