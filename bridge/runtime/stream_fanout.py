"""Byte streams from a room to the routes that want them: one message each, or ordered chunks.

A stream that fits a route's ``max_message_bytes`` becomes one message; a larger one is cut
into chunk messages (``lk-chunk-index``, ``lk-final``) when the route says ``oversize: chunk``,
or rejected (counted) with ``oversize: reject``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bridge.room.errors import RoomError
from bridge.room.streams import ByteStreamReader
from bridge.room.types import Counters
from bridge.router import RoomMessage

if TYPE_CHECKING:
    from bridge.runtime.outbox import Outbox

log = logging.getLogger("roombus.room")


class ByteStreamFanout:
    """A byte stream to one message per route, or ordered chunk messages above the limit."""

    def __init__(
        self,
        room: str,
        counters: Counters,
        routes: list[Outbox],
        values: dict[str, str],
        headers: dict[str, str],
        content_type: str,
        stream_id: str,
    ) -> None:
        self.room = room
        self.counters = counters
        self.routes = routes
        self.values = values
        self.headers = headers
        self.content_type = content_type
        self.stream_id = stream_id

    def _limit(self, worker: Outbox) -> int:
        return int(worker.route.source.byte_stream.max_message_bytes)  # type: ignore[union-attr]

    async def run(self, reader: ByteStreamReader, total: int | None) -> None:
        """Read the stream and offer its messages to the routes."""
        counters = self.counters
        # Routes that may get the stream as chunks, and the buffer of each (one chunk pending so
        # the last one can be marked final).
        buffers: dict[Outbox, bytearray] = {w: bytearray() for w in self.routes}
        pending: dict[Outbox, bytes | None] = dict.fromkeys(self.routes)
        index: dict[Outbox, int] = dict.fromkeys(self.routes, 0)
        live = list(self.routes)
        try:
            async for data in reader:
                for worker in list(live):
                    buf = buffers[worker]
                    buf += data
                    limit = self._limit(worker)
                    oversize = worker.route.source.byte_stream.oversize  # type: ignore[union-attr]
                    if len(buf) > limit and oversize == "reject":
                        counters.inc(f"route.{worker.name}.rejected.too_large")
                        log.warning(
                            "%s: byte stream %s over %d bytes: rejected",
                            worker.route.name,
                            self.stream_id,
                            limit,
                        )
                        live.remove(worker)
                        continue
                    if oversize == "chunk":
                        while len(buf) > limit:
                            chunk = bytes(buf[:limit])
                            del buf[:limit]
                            await self._flush_pending(worker, pending, index, final=False)
                            pending[worker] = chunk
        except RoomError as exc:
            counters.inc("rooms.stream_aborted")
            log.warning("room %s: byte stream %s aborted: %s", self.room, self.stream_id, exc)
            return
        for worker in live:
            buf = buffers[worker]
            if pending[worker] is None:
                # Fits in one message.
                worker.offer(
                    RoomMessage(
                        "byte_stream",
                        bytes(buf),
                        self.values,
                        self.headers,
                        self.content_type,
                        self.stream_id,
                    )
                )
                continue
            if buf:
                await self._flush_pending(worker, pending, index, final=False)
                pending[worker] = bytes(buf)
            await self._flush_pending(worker, pending, index, final=True)

    async def _flush_pending(
        self,
        worker: Outbox,
        pending: dict[Outbox, bytes | None],
        index: dict[Outbox, int],
        *,
        final: bool,
    ) -> None:
        chunk = pending[worker]
        if chunk is None:
            return
        headers = self.headers | {
            "lk-chunk-index": str(index[worker]),
            "lk-final": "true" if final else "false",
        }
        index[worker] += 1
        pending[worker] = None
        worker.offer(
            RoomMessage(
                "byte_stream", chunk, self.values, headers, self.content_type, self.stream_id
            )
        )
