"""The bridge's HTTP port (aiohttp): ``/ping``, ``/ready`` and ``/status`` for probes and people.

* ``/ping``: 200 while the process serves (liveness).
* ``/ready``: 200 once the bridge runs and every room is joined, every endpoint connected and
  every task running; otherwise 503 with a JSON body saying exactly what is not.
* ``/status``: JSON with the same readiness plus the bridge's counters, per room-to-bus route
  its buffer depth and publishes in flight, and per bus source its deliveries in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from bridge.runtime.bridge import Bridge


class HealthServer:
    """Serves the bridge's health endpoints on `host`:`port`."""

    def __init__(self, bridge: Bridge, port: int, host: str = "127.0.0.1") -> None:
        self.bridge = bridge
        self.port = port
        self.host = host
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen."""
        app = web.Application()
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/status", self._status)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port).start()
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def status(self) -> tuple[int, dict[str, object]]:
        """The readiness status code and body."""
        ready, body = self.bridge.readiness()
        return (200 if ready else 503), body

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _ready(self, request: web.Request) -> web.Response:
        code, body = self.status()
        return web.json_response(body, status=code)

    async def _status(self, request: web.Request) -> web.Response:
        bridge = self.bridge
        _, body = bridge.readiness()
        body["bridge_id"] = bridge.bridge_id
        body["counters"] = dict(sorted(bridge.counters.items()))
        body["routes"] = {
            o.name: {"depth": o.depth, "in_flight": o.in_flight} for o in bridge.outboxes
        }
        body["sources"] = {p.name: {"in_flight": p.in_flight} for p in bridge.pumps}
        return web.json_response(body)
