"""`/ping` and `/ready` on 127.0.0.1 for container health checks.

`/ping` answers 200 while the process serves; `/ready` answers 200 once the bridge runs and every
joined room is connected, 503 otherwise, with a one-line JSON body saying which rooms are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.runtime import Bridge


class HealthServer:
    """A minimal HTTP/1.0 responder (two paths, GET only)."""

    def __init__(self, bridge: Bridge, port: int, host: str = "127.0.0.1") -> None:
        self.bridge = bridge
        self.port = port
        self.host = host
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def status(self) -> tuple[int, dict[str, object]]:
        """The readiness status code and body."""
        down = [name for name, link in self.bridge.links.items() if not link.connected.is_set()]
        ready = self.bridge.ready.is_set() and not down
        return (200 if ready else 503), {"ready": ready, "rooms_not_connected": down}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            body: dict[str, object]
            if path == "/ping":
                code, body = 200, {"ok": True}
            elif path == "/ready":
                code, body = self.status()
            else:
                code, body = 404, {"error": "not found"}
            data = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            writer.write(
                f"HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
