"""A small asyncio TCP fault proxy (the Toxiproxy kinds the scenarios need).

`FaultProxy(target_port)` listens on 127.0.0.1 and forwards every connection to the target; the
bridge is configured with the proxy's port instead of the broker's. Faults, each switched on
and off while connections run:

* `down()` / `up()`: the listener closes and every connection is closed (FIN): new connections
  are refused until `up()`.
* `reset()`: every open connection is aborted with an RST (SO_LINGER 0); new ones are accepted.
* `blackhole(True/False)`: nothing gets through in either direction and nothing is closed: the
  bytes wait (in the proxy and the kernel's buffers, like packets a partitioned network keeps
  dropping and TCP keeps retransmitting), new connections are accepted but not connected
  upstream; when it ends, everything flows again in order (unless a side gave up meanwhile).
* `latency(mean, jitter)`: every chunk is held `mean ± jitter` seconds (order kept).
* `bandwidth(bytes_per_s)`: each direction at most that rate.
* `slice(size, delay)`: writes cut into `size`-byte pieces, `delay` seconds apart.
* `clear()`: all of the above off (except down, which `up()` ends).

Counts: `accepted` connections, `open` ones, `bytes` forwarded per direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from dataclasses import dataclass


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None
    tasks: list[asyncio.Task[None]]


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._latency = (0.0, 0.0)
        self._bandwidth: float | None = None
        self._slice: tuple[int, float] | None = None
        self.accepted = 0
        self.bytes = {"up": 0, "down": 0}

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        await self.down()

    @property
    def open(self) -> int:
        return len(self._conns)

    # faults ----------------------------------------------------------------------------------
    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns):
            self._close(conn, rst=False)

    async def up(self) -> None:
        if self._server is None:
            await self.start()

    def reset(self) -> None:
        for conn in list(self._conns):
            self._close(conn, rst=True)

    def blackhole(self, on: bool) -> None:
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def latency(self, mean: float, jitter: float = 0.0) -> None:
        self._latency = (mean, jitter)

    def bandwidth(self, bytes_per_s: float | None) -> None:
        self._bandwidth = bytes_per_s

    def slice(self, size: int, delay: float) -> None:
        self._slice = (size, delay)

    def clear(self) -> None:
        self._latency = (0.0, 0.0)
        self._bandwidth = None
        self._slice = None
        self._flowing.set()

    # forwarding ------------------------------------------------------------------------------
    def _close(self, conn: _Conn, *, rst: bool) -> None:
        self._conns.discard(conn)
        for task in conn.tasks:
            task.cancel()
        for w in (conn.client, conn.upstream):
            if w is None:
                continue
            if rst:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                w.transport.abort()
            else:
                w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(writer, None, [])
        self._conns.add(conn)
        try:
            await self._flowing.wait()  # a blackhole: accepted, never connected upstream
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self._close(conn, rst=False)
                return
            up_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.upstream = up_writer
            if conn not in self._conns:  # closed meanwhile
                up_writer.close()
                return
            conn.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, "up", conn)),
                asyncio.create_task(self._pump(up_reader, writer, "down", conn)),
            ]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            if conn in self._conns:
                self._close(conn, rst=False)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str, conn: _Conn
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            last_due = 0.0
            while True:
                data = await reader.read(65536)
                if not data:
                    await queue.put((0.0, b""))
                    return
                mean, jitter = self._latency
                due = time.monotonic() + max(0.0, random.uniform(mean - jitter, mean + jitter))
                last_due = max(last_due, due)  # order is kept
                await queue.put((last_due, data))

        async def write() -> None:
            while True:
                due, data = await queue.get()
                await self._flowing.wait()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                pieces = [data]
                if self._slice is not None:
                    size, _ = self._slice
                    pieces = [data[i : i + size] for i in range(0, len(data), size)]
                for piece in pieces:
                    await self._flowing.wait()
                    writer.write(piece)
                    await writer.drain()
                    self.bytes[way] += len(piece)
                    if self._bandwidth:
                        await asyncio.sleep(len(piece) / self._bandwidth)
                    if self._slice is not None:
                        await asyncio.sleep(self._slice[1])

        tasks = [asyncio.create_task(read()), asyncio.create_task(write())]
        try:
            await asyncio.gather(*tasks)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            # One side closed or failed: the whole connection goes, as a TCP relay would.
            if conn in self._conns:
                self._close(conn, rst=False)
