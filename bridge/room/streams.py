"""LiveKit text and byte streams (data streams v1 and v2) over a `PacketTransport`.

A stream is a `DataStream.Header` packet, zero or more `DataStream.Chunk` packets and a
`DataStream.Trailer` packet, all on the reliable channel with the same destinations
(livekit-protocol.md §3). Data streams v2 (peers with ``client_protocol >= 2``) add single-packet
streams (`Header.inline_content`) and deflate-raw compression.

`StreamManager` is the whole feature: the room builds it with its transport, feeds it every
stream packet in arrival order (`on_packet`) and tells it when a participant leaves or the
connection goes away. Applications register per-topic handlers, which get a reader, and send with
`send_text`, `stream_text`, `send_bytes`, `send_file` and `stream_bytes`.

Receiving is bounded: a reader buffers at most ``max_buffered_bytes_per_stream`` (and all readers
together at most ``max_buffered_bytes_total``); when a reader is full, `on_packet` waits, which
holds back the room's dispatcher (backpressure). A reader that nobody can read any more (its handler
returned without keeping it) is dropped instead of blocking, and so is a reader nobody consumed for
``stall_timeout`` seconds. Backpressure stops at the room's bounded stream inbox: aiortc cannot
slow a remote sender down, so a reader that falls behind by more than its buffer plus that inbox
loses packets and its stream fails with a chunk gap (tests/interop/test_streams.py shows it).
While one reader is full every other stream waits too, RPC v2 payloads included.

Decisions where the protocol leaves room:

* Chunk ``version``: chunks are handled in arrival order, which on the reliable ordered channel is
  index order. A chunk whose index was already delivered (a duplicate, or a "replacement" with a
  higher version) is dropped and counted ``streams.chunk_duplicate``: data already handed to the
  application cannot be taken back. No LiveKit SDK re-sends chunks today.
* Malformed UTF-8 in a text stream is replaced by U+FFFD (like the JS SDK's non-fatal
  ``TextDecoder``) and counted ``streams.utf8_invalid`` once per stream; the stream is not failed.
* ``total_length == 0`` with data received is not a length error: older JS senders wrote 0 for
  "unknown" in open-ended byte streams.
* A reader that is aborted still yields what it had buffered, then raises `StreamError`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import inspect
import logging
import mimetypes
import os
import threading
import time
import uuid
import weakref
import zlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeAlias, TypeVar

from livekit.protocol import models

from bridge.room.delivery import Delivery
from bridge.room.errors import StreamError
from bridge.room.types import (
    CLIENT_PROTOCOL_DATA_STREAM_V2,
    STREAM_CHUNK_SIZE,
    Counters,
    PacketTransport,
    TrackingPacketTransport,
)

logger = logging.getLogger("roombus.room.streams")

DEFAULT_MAX_BUFFERED_BYTES_PER_STREAM: Final = 4 * 1024 * 1024
DEFAULT_MAX_BUFFERED_BYTES_TOTAL: Final = 64 * 1024 * 1024
# Bomb guard for compressed streams: the decompressed size one stream may reach. The JS and Rust
# SDKs allow 5 GB; a bridge that usually reads whole messages into memory wants far less.
DEFAULT_MAX_DECOMPRESSED_BYTES: Final = 256 * 1024 * 1024
# A full reader that nobody consumed for this long is dropped, so one forgotten reader cannot
# hold the room's dispatcher forever.
DEFAULT_STALL_TIMEOUT: Final = 30.0
DEFAULT_MAX_OPEN_INCOMING_STREAMS: Final = 1024

TEXT_MIME_TYPE: Final = "text/plain"
BYTES_MIME_TYPE: Final = "application/octet-stream"

_DEFLATE_RAW: Final = models.DataStream.DEFLATE_RAW
_COMPRESSION_NONE: Final = models.DataStream.NONE
_CAP_DEFLATE_RAW: Final = models.ClientInfo.Capability.CAP_COMPRESSION_DEFLATE_RAW
# Streams ignored for lack of a handler, remembered so their chunks are dropped silently.
_IGNORED_IDS_LIMIT: Final = 4096
# Inflate output is produced in pieces of at most this size, so one small compressed chunk can
# never allocate a huge buffer in one go.
_INFLATE_PIECE: Final = 64 * 1024
# Payloads above this are compressed in a worker thread (zlib releases the GIL).
_COMPRESS_IN_THREAD_BYTES: Final = 256 * 1024
_FILE_READ_BLOCK: Final = 16 * STREAM_CHUNK_SIZE
_MAX_REASON_CHARS: Final = 500

_T = TypeVar("_T", str, bytes)


# --------------------------------------------------------------------------------------------
# Stream information
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What every stream's header says.

    Attributes:
        stream_id: The stream's id (a UUID string for streams sent by LiveKit SDKs).
        topic: The application topic; handlers are chosen by it.
        mime_type: Content type, ``text/plain`` or ``application/octet-stream`` by default.
        timestamp: When the sender created the stream, milliseconds since the epoch.
        total_size: Total size in bytes (UTF-8 bytes for text, before compression), None when
            the sender did not say.
        attributes: The header's attributes; on a received stream, the trailer's attributes are
            merged in when the stream ends.
        sender_sid: On a received stream, the sender's participant sid as the packet carrying
            the header gave it ('' when unknown): known even before the participant update
            that announces the sender arrives.
    """

    stream_id: str
    topic: str
    mime_type: str
    timestamp: int
    total_size: int | None
    attributes: dict[str, str] = field(default_factory=dict)
    sender_sid: str = ""


@dataclass(frozen=True, slots=True)
class TextStreamInfo(StreamInfo):
    """Information about a text stream.

    Attributes:
        reply_to_id: The stream id this text replies to, None when not a reply.
        attached_stream_ids: Ids of the byte streams sent as attachments of this text.
        operation: `models.DataStream.OperationType` value (CREATE, UPDATE, DELETE, REACTION).
        version: The text's version (for UPDATE operations).
        generated: True when the text was generated (e.g. by an agent).
    """

    reply_to_id: str | None = None
    attached_stream_ids: tuple[str, ...] = ()
    operation: int = 0
    version: int = 0
    generated: bool = False


@dataclass(frozen=True, slots=True)
class ByteStreamInfo(StreamInfo):
    """Information about a byte stream.

    Attributes:
        name: The file or blob name the sender gave, ``unknown`` by default.
    """

    name: str = "unknown"


def _info_from_header(
    header: models.DataStream.Header, sender_sid: str = ""
) -> TextStreamInfo | ByteStreamInfo:
    total = header.total_length if header.HasField("total_length") else None
    attributes = dict(header.attributes)
    if header.HasField("text_header"):
        text = header.text_header
        return TextStreamInfo(
            stream_id=header.stream_id,
            topic=header.topic,
            mime_type=header.mime_type or TEXT_MIME_TYPE,
            timestamp=header.timestamp,
            total_size=total,
            attributes=attributes,
            sender_sid=sender_sid,
            reply_to_id=text.reply_to_stream_id or None,
            attached_stream_ids=tuple(text.attached_stream_ids),
            operation=int(text.operation_type),
            version=text.version,
            generated=text.generated,
        )
    return ByteStreamInfo(
        stream_id=header.stream_id,
        topic=header.topic,
        mime_type=header.mime_type or BYTES_MIME_TYPE,
        timestamp=header.timestamp,
        total_size=total,
        attributes=attributes,
        sender_sid=sender_sid,
        name=header.byte_header.name or "unknown",
    )


# --------------------------------------------------------------------------------------------
# UTF-8 helpers
# --------------------------------------------------------------------------------------------


def split_utf8(data: bytes, limit: int = STREAM_CHUNK_SIZE) -> Iterator[bytes]:
    """Split valid UTF-8 into pieces of at most `limit` bytes, each decodable on its own.

    Cuts only before a byte that starts a character, so no character is split.

    Args:
        data: UTF-8 encoded text.
        limit: Largest piece, in bytes; at least 4 (the longest UTF-8 character).

    Yields:
        Consecutive pieces whose concatenation is `data`; nothing for empty `data`.

    Raises:
        ValueError: `limit` is below 4.
    """
    if limit < 4:
        raise ValueError(f"split_utf8: limit {limit} is below 4 bytes, the longest character")
    start, size = 0, len(data)
    while start < size:
        end = min(start + limit, size)
        # Back off while the cut would land on a continuation byte (0b10xxxxxx).
        while end < size and end > start and (data[end] & 0xC0) == 0x80:
            end -= 1
        if end == start:  # only for invalid input: a run of continuation bytes
            end = min(start + limit, size)
        yield data[start:end]
        start = end


# Counts replacements made by the decoders below, per thread (several event loops may decode at
# once); read before and after each decode, which is synchronous, so the difference is the count
# of that one call.
_utf8_tally = threading.local()


def _utf8_replacements() -> int:
    count: int = getattr(_utf8_tally, "count", 0)
    return count


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    _utf8_tally.count = _utf8_replacements() + 1
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "\ufffd", exc.end


_UTF8_ERRORS: Final = "roombus.streams.replace"
codecs.register_error(_UTF8_ERRORS, _count_and_replace)


class _Utf8Reframer:
    """Incremental UTF-8 decoder that emits only complete characters and counts bad bytes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=_UTF8_ERRORS)
        self.invalid = 0

    def feed(self, data: bytes, *, final: bool = False) -> str:
        before = _utf8_replacements()
        text = self._decoder.decode(data, final)
        self.invalid += _utf8_replacements() - before
        return text


# --------------------------------------------------------------------------------------------
# Receiving
# --------------------------------------------------------------------------------------------


class _Incoming(Generic[_T]):
    """One open incoming stream: its bounded buffer, decoding state and end state.

    The public reader holds this object; this object does not hold the reader (only a weak
    finaliser), so a reader nobody references any more is noticed and its stream dropped.
    """

    def __init__(
        self,
        manager: StreamManager,
        info: TextStreamInfo | ByteStreamInfo,
        sender: str,
        *,
        is_text: bool,
        compressed: bool,
    ) -> None:
        self.manager = manager
        self.info = info
        self.senders = {sender}
        self.sender = sender
        self.is_text = is_text
        self.compressed = compressed
        self.inflater: Any = zlib.decompressobj(wbits=-15) if compressed else None
        self.reframer = _Utf8Reframer() if is_text else None
        self.next_index = 0
        self.bytes_received = 0  # payload bytes (after decompression), for length and progress
        self.pieces: deque[tuple[_T, int]] = deque()
        self.buffered = 0
        self.readable = asyncio.Event()
        self.ended = False  # the sender finished (or the stream was aborted)
        self.error: StreamError | None = None
        self.dropped = False  # nobody will read: discard everything from now on
        self.last_read = time.monotonic()
        self.utf8_noted = False
        self.drop_error: StreamError | None = None

    @property
    def label(self) -> str:
        kind = "text" if self.is_text else "byte"
        return (
            f"{kind} stream {self.info.stream_id} from {self.sender!r} (topic {self.info.topic!r})"
        )

    @property
    def open(self) -> bool:
        return not self.ended and not self.dropped

    # -- called by the manager ----------------------------------------------------------------

    def push(self, piece: _T, nbytes: int) -> None:
        if self.dropped or self.ended:
            return
        self.pieces.append((piece, nbytes))
        self.buffered += nbytes
        self.manager._buffered_total += nbytes
        self.readable.set()

    def finish(self, error: StreamError | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        self.readable.set()
        self.manager._space_freed.set()

    def drop(self, why: str) -> None:
        """Discard buffered and future data: nobody is going to read it."""
        if self.dropped:
            return
        self.dropped = True
        self.drop_error = StreamError(f"{self.label}: reading failed: {why}")
        self._release(self.buffered)
        self.pieces.clear()
        self.readable.set()

    def _release(self, nbytes: int) -> None:
        self.buffered -= nbytes
        self.manager._buffered_total -= nbytes
        self.last_read = time.monotonic()
        self.manager._last_read = self.last_read
        self.manager._space_freed.set()

    def reader_released(self) -> None:
        """Weak finaliser of the public reader: it was garbage collected."""
        self.manager._call_in_loop(self._on_reader_released)

    def _on_reader_released(self) -> None:
        if self.dropped:
            return
        if self.pieces or not self.ended:
            self.manager.counters.inc("streams.unread_dropped")
            logger.debug(
                "%s: reading failed: handler did not read it; dropping the rest", self.label
            )
        self.drop("the reader was released without being read")

    # -- called by the reader -------------------------------------------------------------------

    async def next_piece(self) -> _T:
        while True:
            if self.pieces:
                piece, nbytes = self.pieces.popleft()
                self._release(nbytes)
                return piece
            if self.dropped and self.drop_error is not None:
                raise self.drop_error
            if self.ended:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            self.readable.clear()
            await self.readable.wait()


class _StreamReader(Generic[_T]):
    """Shared behaviour of text and byte readers."""

    __slots__ = ("__weakref__", "_state")
    _state: _Incoming[_T]

    def __init__(self, state: _Incoming[_T]) -> None:
        self._state = state
        finaliser = weakref.finalize(self, state.reader_released)
        finaliser.atexit = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> _T:
        return await self._state.next_piece()

    @property
    def bytes_received(self) -> int:
        """Payload bytes received so far (after decompression; UTF-8 bytes for text)."""
        return self._state.bytes_received

    @property
    def progress(self) -> float | None:
        """Fraction received, ``bytes_received / total_size``; None when the size is unknown."""
        total = self._state.info.total_size
        if not total:
            return None
        return min(1.0, self._state.bytes_received / total)

    def close(self) -> None:
        """Stop reading: drop what is buffered and everything still to come."""
        if not self._state.dropped:
            if self._state.pieces or not self._state.ended:
                self._state.manager.counters.inc("streams.reader_closed")
            self._state.drop("the reader was closed")


class TextStreamReader(_StreamReader[str]):
    """An incoming text stream; iterate for text pieces (one per chunk) or call `read_all`.

    Raises `StreamError` from iteration when the stream ends abnormally.
    """

    __slots__ = ()

    @property
    def info(self) -> TextStreamInfo:
        """The stream's information; attributes include the trailer's once it has ended."""
        info = self._state.info
        assert isinstance(info, TextStreamInfo)
        return info

    async def read_all(self, *, max_size: int | None = None) -> str:
        """Read the whole text.

        Args:
            max_size: Fail (and drop the stream) once more than this many UTF-8 bytes arrived.

        Returns:
            The text.

        Raises:
            StreamError: The stream ended abnormally, or `max_size` was exceeded.
        """
        parts: list[str] = []
        async for part in self:
            parts.append(part)
            if max_size is not None and self._state.bytes_received > max_size:
                self.close()
                raise StreamError(f"{self._state.label}: reading failed: over {max_size} bytes")
        return "".join(parts)


class ByteStreamReader(_StreamReader[bytes]):
    """An incoming byte stream; iterate for byte chunks or call `read_all`.

    Raises `StreamError` from iteration when the stream ends abnormally.
    """

    __slots__ = ()

    @property
    def info(self) -> ByteStreamInfo:
        """The stream's information; attributes include the trailer's once it has ended."""
        info = self._state.info
        assert isinstance(info, ByteStreamInfo)
        return info

    async def read_all(self, *, max_size: int | None = None) -> bytes:
        """Read the whole payload.

        Args:
            max_size: Fail (and drop the stream) once more than this many bytes arrived.

        Returns:
            The payload.

        Raises:
            StreamError: The stream ended abnormally, or `max_size` was exceeded.
        """
        parts: list[bytes] = []
        async for part in self:
            parts.append(part)
            if max_size is not None and self._state.bytes_received > max_size:
                self.close()
                raise StreamError(f"{self._state.label}: reading failed: over {max_size} bytes")
        return b"".join(parts)


TextStreamHandler: TypeAlias = Callable[[TextStreamReader, str], Awaitable[None] | None]
ByteStreamHandler: TypeAlias = Callable[[ByteStreamReader, str], Awaitable[None] | None]


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------


class _Outgoing:
    """One outgoing stream on the wire: header, numbered chunks, trailer."""

    def __init__(
        self,
        manager: StreamManager,
        header: models.DataStream.Header,
        destinations: Sequence[str],
    ) -> None:
        self.manager = manager
        self.header = header
        self.destinations = list(destinations)
        self.next_index = 0
        self.closed = False
        self.abort_reason: str | None = None

    @property
    def stream_id(self) -> str:
        return self.header.stream_id

    def _packet(self) -> models.DataPacket:
        return models.DataPacket(destination_identities=self.destinations)

    async def open(self) -> None:
        self.manager._check_open()
        _check_header_size(self.header)
        packet = self._packet()
        packet.stream_header.CopyFrom(self.header)
        await self.manager._transport.send_packet(packet, reliable=True)
        self.manager._outgoing[self.stream_id] = self

    def _check_usable(self) -> None:
        if self.abort_reason is not None:
            raise StreamError(f"stream {self.stream_id}: sending failed: {self.abort_reason}")
        if self.closed:
            raise StreamError(f"stream {self.stream_id}: sending failed: already closed")

    async def send_chunk(self, content: bytes) -> None:
        self._check_usable()
        packet = self._packet()
        packet.stream_chunk.stream_id = self.stream_id
        packet.stream_chunk.chunk_index = self.next_index
        packet.stream_chunk.content = content
        self.next_index += 1
        await self.manager._transport.send_packet(packet, reliable=True)

    async def close(
        self, reason: str = "", attributes: Mapping[str, str] | None = None, *, track: bool = False
    ) -> Delivery | None:
        """Send the trailer; with `track`, return its `Delivery` (which covers the stream)."""
        self._check_usable()
        self.closed = True
        self.manager._outgoing.pop(self.stream_id, None)
        packet = self._packet()
        packet.stream_trailer.stream_id = self.stream_id
        packet.stream_trailer.reason = reason[:_MAX_REASON_CHARS]
        if attributes:
            packet.stream_trailer.attributes.update(attributes)
        if track:
            return await self.manager._send_tracked(packet)
        await self.manager._transport.send_packet(packet, reliable=True)
        return None

    async def close_abnormally(self, reason: str) -> None:
        """Best effort abnormal trailer after a failure; never raises."""
        if self.closed or self.abort_reason is not None:
            self.manager._outgoing.pop(self.stream_id, None)
            return
        try:
            await self.close(reason)
        except Exception as exc:  # noqa: BLE001 - already failing; the first error is what counts
            logger.debug("stream %s: sending abnormal trailer failed: %s", self.stream_id, exc)

    def abort(self, reason: str) -> None:
        if not self.closed:
            self.abort_reason = reason
        self.manager._outgoing.pop(self.stream_id, None)


def _check_header_size(header: models.DataStream.Header) -> None:
    size = header.ByteSize()
    if size > STREAM_CHUNK_SIZE:
        raise StreamError(
            f"stream {header.stream_id}: sending failed: header is {size} bytes, over the "
            f"{STREAM_CHUNK_SIZE}-byte limit (attributes or destination list too large)"
        )


class _StreamWriter:
    """Shared behaviour of text and byte writers."""

    def __init__(self, stream: _Outgoing, total_size: int | None) -> None:
        self._stream = stream
        self._total_size = total_size
        self._written = 0
        self._lock = asyncio.Lock()

    @property
    def bytes_written(self) -> int:
        """Payload bytes written so far."""
        return self._written

    async def _write_bytes(self, data: bytes, pieces: Iterator[bytes]) -> None:
        async with self._lock:
            self._stream._check_usable()
            if self._total_size is not None and self._written + len(data) > self._total_size:
                raise StreamError(
                    f"stream {self._stream.stream_id}: write failed: {self._written + len(data)} "
                    f"bytes would exceed the announced total of {self._total_size}"
                )
            for piece in pieces:
                await self._stream.send_chunk(piece)
                self._written += len(piece)

    async def aclose(
        self,
        reason: str | None = None,
        *,
        attributes: Mapping[str, str] | None = None,
        wait_delivered: bool = False,
    ) -> None:
        """End the stream with a trailer.

        Args:
            reason: None or empty for a normal end; any other text ends the stream abnormally and
                the receiver's reader raises `StreamError` with it.
            attributes: Extra attributes the receiver merges into the stream's attributes.
            wait_delivered: Return only once livekit-server has acknowledged the trailer (and
                so the whole stream); `NotConnectedError` if the connection was lost first.

        Raises:
            StreamError: The stream was already closed or aborted (e.g. the room closed), or a
                normal end was asked for fewer bytes than the announced total (the trailer then
                says so and the receiver fails too).
        """
        delivery: Delivery | None = None
        async with self._lock:
            if self._stream.closed and not reason:
                return
            if not reason and self._total_size is not None and self._written != self._total_size:
                short = f"incomplete: sent {self._written} of {self._total_size} bytes"
                await self._stream.close(short, attributes)
                raise StreamError(f"stream {self._stream.stream_id}: closing failed: {short}")
            if reason and (self._stream.closed or self._stream.abort_reason is not None):
                return  # already over; nothing more to tell the receiver
            delivery = await self._stream.close(reason or "", attributes, track=wait_delivered)
        if delivery is not None:
            await delivery

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.aclose()
            return
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with contextlib.suppress(Exception):
            # The block's own exception is the one to report; a failing trailer adds nothing.
            await self.aclose(reason)


class TextStreamWriter(_StreamWriter):
    """An outgoing text stream: `write` text, then `aclose`; also an async context manager."""

    def __init__(self, stream: _Outgoing, info: TextStreamInfo) -> None:
        super().__init__(stream, info.total_size)
        self.info = info

    async def write(self, text: str) -> None:
        """Send `text` as one or more chunks split on character boundaries.

        Raises:
            StreamError: The stream is closed or aborted, or the total size would be exceeded.
            UnicodeEncodeError: `text` holds lone surrogates (not valid in UTF-8).
        """
        data = text.encode("utf-8")
        await self._write_bytes(data, split_utf8(data))


class ByteStreamWriter(_StreamWriter):
    """An outgoing byte stream: `write` bytes, then `aclose`; also an async context manager."""

    def __init__(self, stream: _Outgoing, info: ByteStreamInfo) -> None:
        super().__init__(stream, info.total_size)
        self.info = info

    async def write(self, data: bytes) -> None:
        """Send `data` as one or more chunks of at most `STREAM_CHUNK_SIZE` bytes.

        Raises:
            StreamError: The stream is closed or aborted, or the total size would be exceeded.
        """
        data = bytes(data)
        await self._write_bytes(data, _split_bytes(data))


def _split_bytes(data: bytes, limit: int = STREAM_CHUNK_SIZE) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), limit):
        yield bytes(view[start : start + limit])


def _deflate_raw(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


async def _compress(data: bytes) -> bytes:
    if len(data) > _COMPRESS_IN_THREAD_BYTES:
        return await asyncio.to_thread(_deflate_raw, data)
    return _deflate_raw(data)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


class StreamManager:
    """Text and byte streams of one room: per-topic receive handlers and the send API.

    Args:
        transport: The room's packet transport.
        max_buffered_bytes_per_stream: Most bytes one reader buffers before `on_packet` waits.
        max_decompressed_bytes: Most bytes one compressed stream may decompress to (bomb guard).
        max_buffered_bytes_total: Most bytes all readers together buffer before `on_packet` waits
            (a reader with an empty buffer always gets its next piece).
        stall_timeout: Seconds `on_packet` waits on a full reader nobody consumes before it
            drops that stream (None: wait as long as the reader is referenced).
        max_open_incoming_streams: Streams received at once; later headers are dropped.
    """

    def __init__(
        self,
        transport: PacketTransport,
        *,
        max_buffered_bytes_per_stream: int = DEFAULT_MAX_BUFFERED_BYTES_PER_STREAM,
        max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
        max_buffered_bytes_total: int = DEFAULT_MAX_BUFFERED_BYTES_TOTAL,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        max_open_incoming_streams: int = DEFAULT_MAX_OPEN_INCOMING_STREAMS,
    ) -> None:
        self._transport = transport
        self._max_per_stream = max_buffered_bytes_per_stream
        self._max_total = max_buffered_bytes_total
        self._max_decompressed = max_decompressed_bytes
        self._stall_timeout = stall_timeout
        self._max_open = max_open_incoming_streams
        self._text_handlers: dict[str, TextStreamHandler] = {}
        self._byte_handlers: dict[str, ByteStreamHandler] = {}
        # Called for streams whose topic has no handler of its own (the bridge routes by glob).
        self._text_fallback: TextStreamHandler | None = None
        self._byte_fallback: ByteStreamHandler | None = None
        self._incoming: dict[str, _Incoming[Any]] = {}
        self._ignored: OrderedDict[str, str] = OrderedDict()  # stream id -> sender
        self._outgoing: dict[str, _Outgoing] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._buffered_total = 0
        self._space_freed = asyncio.Event()
        self._last_read = time.monotonic()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id = threading.get_ident()

    @property
    def counters(self) -> Counters:
        """The room's counters (drops, malformed input)."""
        return self._transport.counters

    @property
    def buffered_bytes(self) -> int:
        """Bytes buffered in all readers right now."""
        return self._buffered_total

    # ---------------------------------------------------------------------------- handlers --

    def register_text_stream_handler(self, topic: str, handler: TextStreamHandler) -> None:
        """Call `handler(reader, sender_identity)` for each text stream on `topic`.

        A coroutine handler runs as a task owned by the manager; a plain function is called
        directly and may keep the reader to read it later.

        Raises:
            ValueError: `topic` already has a text stream handler.
        """
        if topic in self._text_handlers:
            raise ValueError(f"streams: a text stream handler for topic {topic!r} is registered")
        self._text_handlers[topic] = handler

    def unregister_text_stream_handler(self, topic: str) -> None:
        """Remove the text stream handler of `topic` (no error if there is none)."""
        self._text_handlers.pop(topic, None)

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        """Call `handler(reader, sender_identity)` for each byte stream on `topic`.

        Raises:
            ValueError: `topic` already has a byte stream handler.
        """
        if topic in self._byte_handlers:
            raise ValueError(f"streams: a byte stream handler for topic {topic!r} is registered")
        self._byte_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        """Remove the byte stream handler of `topic` (no error if there is none)."""
        self._byte_handlers.pop(topic, None)

    def set_fallback_text_handler(self, handler: TextStreamHandler | None) -> None:
        """Handle text streams of every topic without a handler of its own (None: drop them).

        Reserved ``lk.`` topics (RPC, chat, transcriptions) never reach the fallback.
        """
        self._text_fallback = handler

    def set_fallback_byte_handler(self, handler: ByteStreamHandler | None) -> None:
        """Handle byte streams of every topic without a handler of its own (None: drop them)."""
        self._byte_fallback = handler

    # ----------------------------------------------------------------------------- receiving --

    async def on_packet(self, packet: models.DataPacket) -> None:
        """Handle one received stream packet (header, chunk or trailer), in arrival order.

        Waits while the target reader is full (backpressure). Never raises for bad input: it is
        logged and counted.
        """
        if self._closed:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread_id = threading.get_ident()
        which = packet.WhichOneof("value")
        sender = packet.participant_identity
        if which == "stream_header":
            await self._on_header(packet.stream_header, sender, packet.participant_sid)
        elif which == "stream_chunk":
            await self._on_chunk(packet.stream_chunk, sender)
        elif which == "stream_trailer":
            await self._on_trailer(packet.stream_trailer, sender)
        else:
            self.counters.inc("streams.not_a_stream_packet")
            logger.debug("streams: handling packet failed: %r is not a stream packet", which)

    async def _on_header(
        self, header: models.DataStream.Header, sender: str, sender_sid: str = ""
    ) -> None:
        sid = header.stream_id
        content = header.WhichOneof("content_header")
        if not sid or content is None:
            self.counters.inc("streams.malformed")
            logger.debug("streams: header from %r dropped: no stream id or content header", sender)
            return
        if sid in self._incoming or sid in self._ignored:
            self.counters.inc("streams.duplicate_header")
            logger.debug("streams: header of stream %s from %r dropped: duplicate", sid, sender)
            return
        kind = "text" if content == "text_header" else "byte"
        if header.compression not in (_COMPRESSION_NONE, _DEFLATE_RAW):
            self._ignore(sid, sender)
            self.counters.inc("streams.unknown_compression")
            logger.warning(
                "streams: %s stream %s from %r dropped: unknown compression %d",
                kind, sid, sender, header.compression,
            )  # fmt: skip
            return
        if header.encryption_type != models.Encryption.NONE:
            self._ignore(sid, sender)
            self.counters.inc("streams.encrypted_unsupported")
            logger.warning(
                "streams: %s stream %s from %r dropped: per-stream encryption is not supported",
                kind, sid, sender,
            )  # fmt: skip
            return
        handler: TextStreamHandler | ByteStreamHandler | None = (
            self._text_handlers.get(header.topic)
            if kind == "text"
            else self._byte_handlers.get(header.topic)
        )
        if handler is None and not header.topic.startswith("lk."):
            handler = self._text_fallback if kind == "text" else self._byte_fallback
        if handler is None:
            self._ignore(sid, sender)
            self.counters.inc("streams.no_handler")
            logger.debug(
                "streams: %s stream %s from %r ignored: no handler for topic %r",
                kind, sid, sender, header.topic,
            )  # fmt: skip
            return
        inline = header.HasField("inline_content")
        if not inline and len(self._incoming) >= self._max_open:
            self._ignore(sid, sender)
            self.counters.inc("streams.too_many_open")
            logger.warning(
                "streams: %s stream %s from %r dropped: %d streams already open",
                kind, sid, sender, len(self._incoming),
            )  # fmt: skip
            return

        info = _info_from_header(header, sender_sid)
        state: _Incoming[Any] = _Incoming(
            self,
            info,
            sender,
            is_text=kind == "text",
            compressed=header.compression == _DEFLATE_RAW,
        )
        self.counters.inc("streams.received")
        reader: TextStreamReader | ByteStreamReader = (
            TextStreamReader(state) if kind == "text" else ByteStreamReader(state)
        )
        if not inline:
            self._incoming[sid] = state
        self._invoke(handler, reader, sender, state)
        # Only the handler may keep the reader alive; see `_Incoming.reader_released`.
        del reader
        if inline and await self._feed(state, header.inline_content):
            await self._end(state)

    def _invoke(
        self,
        handler: TextStreamHandler | ByteStreamHandler,
        reader: TextStreamReader | ByteStreamReader,
        sender: str,
        state: _Incoming[Any],
    ) -> None:
        try:
            result = handler(reader, sender)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - application code may raise anything; it is logged
            self._log_handler_failure(state)
            return
        if inspect.isawaitable(result):
            # The handler's own coroutine becomes the task, so a task cancelled before it ever
            # ran closes the coroutine cleanly (no "never awaited" warning).
            task = asyncio.ensure_future(result)
            if isinstance(task, asyncio.Task):
                task.set_name(f"stream-handler:{state.info.topic}:{state.info.stream_id}")
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._handler_done, state))

    def _handler_done(self, state: _Incoming[Any], task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.counters.inc("streams.handler_failed")
            logger.error(
                "streams: handler for topic %r failed on %s", state.info.topic, state.label,
                exc_info=exc,
            )  # fmt: skip
            state.drop("the handler failed")

    def _log_handler_failure(self, state: _Incoming[Any]) -> None:
        """Log a handler's exception (call from its except block) and drop its stream.

        Dropping is deterministic here: the logged traceback may keep the reader alive (a log
        handler can hold the record), so its release cannot be relied on to unblock `on_packet`.
        """
        self.counters.inc("streams.handler_failed")
        logger.exception(
            "streams: handler for topic %r failed on %s", state.info.topic, state.label
        )
        state.drop("the handler failed")

    def _ignore(self, stream_id: str, sender: str) -> None:
        self._ignored[stream_id] = sender
        while len(self._ignored) > _IGNORED_IDS_LIMIT:
            self._ignored.popitem(last=False)

    async def _on_chunk(self, chunk: models.DataStream.Chunk, sender: str) -> None:
        sid = chunk.stream_id
        state = self._incoming.get(sid)
        if state is None:
            if sid not in self._ignored:
                self.counters.inc("streams.unknown_stream")
                logger.debug("streams: chunk of unknown stream %s from %r dropped", sid, sender)
            return
        if sender:
            # An agent may send a header on behalf of another identity (§2.3); its chunks then
            # carry the agent's identity, so remember every sender seen on this stream.
            state.senders.add(sender)
        if state.dropped:
            return
        index = chunk.chunk_index
        if index < state.next_index:
            self.counters.inc("streams.chunk_duplicate")
            logger.debug(
                "%s: chunk %d dropped: already received (version %d)",
                state.label,
                index,
                chunk.version,
            )
            return
        if index > state.next_index:
            self.counters.inc("streams.chunk_gap")
            self._abort(state, f"chunk gap: expected chunk {state.next_index}, got {index}")
            return
        state.next_index += 1
        await self._feed(state, chunk.content)

    async def _on_trailer(self, trailer: models.DataStream.Trailer, sender: str) -> None:
        sid = trailer.stream_id
        state = self._incoming.get(sid)
        if state is None:
            if self._ignored.pop(sid, None) is None:
                self.counters.inc("streams.unknown_stream")
                logger.debug("streams: trailer of unknown stream %s from %r dropped", sid, sender)
            return
        if trailer.attributes:
            state.info = replace(
                state.info, attributes={**state.info.attributes, **trailer.attributes}
            )
        if trailer.reason:
            self.counters.inc("streams.abnormal_end")
            self._abort(state, f"abnormal end: {trailer.reason}", final=True)
            return
        await self._end(state)

    async def _feed(self, state: _Incoming[Any], content: bytes) -> bool:
        """Decompress and decode `content` into the reader, waiting for room; False if it failed."""
        if not content:
            return True
        if not state.compressed:
            return await self._deliver(state, content)
        try:
            for piece in self._inflate(state, content):
                if not await self._deliver(state, piece):
                    return False
        except zlib.error as exc:
            self.counters.inc("streams.decompress_failed")
            self._abort(state, f"decompression failed: {exc}")
            return False
        return True

    @staticmethod
    def _inflate(state: _Incoming[Any], content: bytes) -> Iterator[bytes]:
        inflater = state.inflater
        pending = content
        while True:
            if inflater.eof:
                if pending or inflater.unused_data:
                    raise zlib.error("data after the end of the compressed stream")
                return
            out: bytes = inflater.decompress(pending, _INFLATE_PIECE)
            pending = inflater.unconsumed_tail
            if out:
                yield out
            if not pending and len(out) < _INFLATE_PIECE:
                return

    async def _deliver(self, state: _Incoming[Any], data: bytes) -> bool:
        """Count, check and buffer payload bytes (decompressed); False if the stream ended."""
        if not state.open:
            return False
        state.bytes_received += len(data)
        if state.compressed and state.bytes_received > self._max_decompressed:
            self.counters.inc("streams.decompressed_too_large")
            self._abort(
                state,
                f"decompressed size over the {self._max_decompressed}-byte limit",
            )
            return False
        total = state.info.total_size
        if total and state.bytes_received > total:
            self.counters.inc("streams.length_mismatch")
            self._abort(state, f"received more than the announced {total} bytes")
            return False
        piece: str | bytes = data
        if state.reframer is not None:
            piece = state.reframer.feed(data)
            self._note_invalid_utf8(state)
        if not await self._wait_for_room(state, len(data)):
            return False
        if piece:
            state.push(piece, len(data))
        return True

    async def _wait_for_room(self, state: _Incoming[Any], nbytes: int) -> bool:
        """Backpressure: wait until the reader (and all readers together) can take `nbytes`."""
        waiting_since = time.monotonic()
        while state.open and state.buffered > 0:
            own_full = state.buffered + nbytes > self._max_per_stream
            if not own_full and self._buffered_total + nbytes <= self._max_total:
                break
            self._space_freed.clear()
            if self._stall_timeout is None:
                await self._space_freed.wait()
                continue
            # Blocked by this reader: only its reads count as progress; by the total: any read.
            last_read = max(waiting_since, state.last_read if own_full else self._last_read)
            try:
                async with asyncio.timeout(
                    max(0.0, self._stall_timeout - (time.monotonic() - last_read))
                ):
                    await self._space_freed.wait()
            except TimeoutError:
                last_read = max(waiting_since, state.last_read if own_full else self._last_read)
                if time.monotonic() - last_read < self._stall_timeout:
                    continue  # something was read meanwhile; keep waiting
                self.counters.inc("streams.stalled_dropped")
                logger.warning(
                    "%s: reading failed: reader full and not read for %.0f s; dropping the stream",
                    state.label, self._stall_timeout,
                )  # fmt: skip
                state.drop(f"not read for {self._stall_timeout:.0f} s while full")
        return state.open

    def _note_invalid_utf8(self, state: _Incoming[Any]) -> None:
        reframer = state.reframer
        if reframer is not None and reframer.invalid and not state.utf8_noted:
            state.utf8_noted = True
            self.counters.inc("streams.utf8_invalid")
            logger.warning("%s: decoding failed: invalid UTF-8 replaced by U+FFFD", state.label)

    async def _end(self, state: _Incoming[Any]) -> None:
        """Normal end of the sender's stream: flush decoders, check the length, finish."""
        sid = state.info.stream_id
        self._incoming.pop(sid, None)
        if not state.open:
            return
        if state.compressed and not state.inflater.eof:
            # Lenient: the length check below catches truncation when the size is known.
            logger.debug("%s: compressed stream ended without a final deflate block", state.label)
        if state.reframer is not None:
            tail = state.reframer.feed(b"", final=True)
            self._note_invalid_utf8(state)
            if tail:
                state.push(tail, 0)
        total = state.info.total_size
        if (
            total is not None
            and state.bytes_received != total
            and not (total == 0 and state.bytes_received > 0)
        ):
            self.counters.inc("streams.length_mismatch")
            self._abort(
                state,
                f"length mismatch: received {state.bytes_received} of {total} bytes",
                final=True,
            )
            return
        state.finish()

    def _abort(
        self, state: _Incoming[Any], why: str, *, count_as: str | None = None, final: bool = False
    ) -> None:
        """End `state` with a `StreamError`; unless `final`, drop its later packets silently."""
        sid = state.info.stream_id
        self._incoming.pop(sid, None)
        if not final:
            self._ignore(sid, state.sender)
        if count_as:
            self.counters.inc(count_as)
        if state.ended:
            return
        if not state.dropped:
            logger.info("%s: receiving failed: %s", state.label, why)
        state.finish(StreamError(f"{state.label}: receiving failed: {why}"))

    def on_participant_left(self, identity: str) -> None:
        """Abort every stream `identity` was sending us (their readers raise `StreamError`)."""
        for state in [s for s in self._incoming.values() if identity in s.senders]:
            self._abort(state, f"sender {identity!r} left the room", count_as="streams.sender_left")
        for sid in [s for s, who in self._ignored.items() if who == identity]:
            del self._ignored[sid]

    def abort_all(self, reason: str) -> None:
        """Abort every open stream, both directions (room closed or reconnecting).

        Readers raise `StreamError`; writers raise `StreamError` on their next write or close.
        """
        for state in list(self._incoming.values()):
            self._abort(state, reason, count_as="streams.aborted")
        self._incoming.clear()
        self._ignored.clear()
        for stream in list(self._outgoing.values()):
            stream.abort(reason)
        self._outgoing.clear()

    async def aclose(self) -> None:
        """Cancel handler tasks and abort every stream; the manager accepts nothing afterwards."""
        self._closed = True
        self.abort_all("stream manager closed")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _call_in_loop(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop thread (garbage collection may run elsewhere)."""
        if threading.get_ident() == self._thread_id or self._loop is None:
            callback()
            return
        with contextlib.suppress(RuntimeError):  # loop already closed: nothing left to wake
            self._loop.call_soon_threadsafe(callback)

    # ------------------------------------------------------------------------------- sending --

    def _check_open(self) -> None:
        if self._closed:
            raise StreamError("streams: sending failed: stream manager closed")

    def _recipients(self, destinations: Sequence[str]) -> list[str]:
        local = self._transport.local_identity
        targets = destinations if destinations else self._transport.remote_identities()
        return [identity for identity in targets if identity != local]

    def _v2_support(self, destinations: Sequence[str]) -> tuple[bool, bool]:
        """(every recipient reads v2 streams, every recipient also inflates deflate-raw)."""
        v2 = compress = True
        for identity in self._recipients(destinations):
            participant = self._transport.participant_info(identity)
            if participant is None:  # not (yet) in the room: assume the least
                return False, False
            if participant.client_protocol < CLIENT_PROTOCOL_DATA_STREAM_V2:
                return False, False
            if _CAP_DEFLATE_RAW not in participant.capabilities:
                compress = False
        return v2, compress

    @staticmethod
    def _header(
        stream_id: str | None,
        *,
        topic: str,
        mime_type: str,
        attributes: Mapping[str, str] | None,
        total_size: int | None,
    ) -> models.DataStream.Header:
        header = models.DataStream.Header(
            stream_id=stream_id or str(uuid.uuid4()),
            timestamp=_now_ms(),
            topic=topic,
            mime_type=mime_type,
            attributes=dict(attributes or {}),
        )
        if total_size is not None:
            header.total_length = total_size
        return header

    async def _send_whole(
        self, header: models.DataStream.Header, payload: bytes, destinations: Sequence[str], *,
        text: bool, track: bool = False,
    ) -> Delivery | None:  # fmt: skip
        """Send a complete payload: inline or compressed when every recipient can read it.

        With `track`, returns the `Delivery` of the last packet (the inline header or trailer).
        """
        self._check_open()
        _check_header_size(header)
        v2, may_compress = self._v2_support(destinations)
        compressed: bytes | None = None
        if v2:
            if may_compress and payload:
                candidate = await _compress(payload)
                if len(candidate) < len(payload):
                    compressed = candidate
            content = compressed if compressed is not None else payload
            if len(content) < STREAM_CHUNK_SIZE:  # else it cannot fit: skip building the packet
                packet = models.DataPacket(destination_identities=list(destinations))
                packet.stream_header.CopyFrom(header)
                packet.stream_header.inline_content = content
                if compressed is not None:
                    packet.stream_header.compression = _DEFLATE_RAW
                if packet.ByteSize() <= STREAM_CHUNK_SIZE:
                    if track:
                        return await self._send_tracked(packet)
                    await self._transport.send_packet(packet, reliable=True)
                    return None
        if compressed is not None:
            header.compression = _DEFLATE_RAW
            pieces = _split_bytes(compressed)
        else:
            pieces = split_utf8(payload) if text else _split_bytes(payload)
        stream = _Outgoing(self, header, destinations)
        await stream.open()
        try:
            for piece in pieces:
                await stream.send_chunk(piece)
        except BaseException as exc:
            await stream.close_abnormally(f"sending failed: {type(exc).__name__}")
            raise
        return await stream.close(track=track)

    async def _send_tracked(self, packet: models.DataPacket) -> Delivery:
        transport = self._transport
        if not isinstance(transport, TrackingPacketTransport):
            raise TypeError("streams: this transport cannot track deliveries")
        return await transport.send_packet_tracked(packet)

    async def send_text(
        self,
        text: str,
        *,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        reply_to_id: str | None = None,
        attachments: Sequence[str | os.PathLike[str]] = (),
        stream_id: str | None = None,
        wait_delivered: bool = False,
    ) -> TextStreamInfo:
        """Send a whole text as a stream (one inline packet when every recipient reads v2).

        Each attachment is sent afterwards as a byte stream (`send_file`) whose id is listed in
        the text's `attached_stream_ids`.

        Args:
            text: The text.
            topic: The topic receivers' handlers are registered for.
            destination_identities: Recipients; empty for every participant.
            attributes: Stream attributes.
            reply_to_id: Id of the stream this text replies to.
            attachments: Paths of files to attach.
            stream_id: The stream id to use; a fresh UUID by default.
            wait_delivered: Return only once livekit-server has acknowledged the last packet
                sent (the text's, or its last attachment's), so everything before it too.

        Returns:
            The sent stream's information.

        Raises:
            StreamError: The header is too large, or an attachment could not be read.
            NotConnectedError: The room is not connected, or (with `wait_delivered`) the
                connection was lost before the server acknowledged the stream.
        """
        data = text.encode("utf-8")
        attachment_ids = [str(uuid.uuid4()) for _ in attachments]
        header = self._header(
            stream_id, topic=topic, mime_type=TEXT_MIME_TYPE, attributes=attributes,
            total_size=len(data),
        )  # fmt: skip
        header.text_header.operation_type = models.DataStream.CREATE
        header.text_header.attached_stream_ids.extend(attachment_ids)
        if reply_to_id:
            header.text_header.reply_to_stream_id = reply_to_id
        info = _info_from_header(header)
        # Acknowledgement is cumulative: the delivery of the last packet covers all before it.
        delivery = await self._send_whole(
            header, data, destination_identities, text=True,
            track=wait_delivered and not attachments,
        )  # fmt: skip
        self.counters.inc("streams.sent")
        for i, (attachment_id, path) in enumerate(zip(attachment_ids, attachments, strict=True)):
            last = i == len(attachments) - 1
            await self.send_file(
                path, topic=topic, destination_identities=destination_identities,
                stream_id=attachment_id, wait_delivered=wait_delivered and last,
            )  # fmt: skip
        if delivery is not None:
            await delivery
        assert isinstance(info, TextStreamInfo)
        return info

    async def stream_text(
        self,
        *,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        total_size: int | None = None,
        reply_to_id: str | None = None,
        stream_id: str | None = None,
    ) -> TextStreamWriter:
        """Open a text stream to write incrementally (never inline, never compressed).

        Args:
            topic: The topic receivers' handlers are registered for.
            destination_identities: Recipients; empty for every participant.
            attributes: Stream attributes.
            total_size: Total UTF-8 bytes that will be written, if known.
            reply_to_id: Id of the stream this text replies to.
            stream_id: The stream id to use; a fresh UUID by default.

        Returns:
            A writer whose header has been sent.

        Raises:
            StreamError: The header is too large.
            NotConnectedError: The room is not connected.
        """
        header = self._header(
            stream_id, topic=topic, mime_type=TEXT_MIME_TYPE, attributes=attributes,
            total_size=total_size,
        )  # fmt: skip
        header.text_header.operation_type = models.DataStream.CREATE
        if reply_to_id:
            header.text_header.reply_to_stream_id = reply_to_id
        info = _info_from_header(header)
        assert isinstance(info, TextStreamInfo)
        stream = _Outgoing(self, header, destination_identities)
        await stream.open()
        self.counters.inc("streams.sent")
        return TextStreamWriter(stream, info)

    async def send_bytes(
        self,
        data: bytes,
        *,
        name: str = "unknown",
        mime_type: str = BYTES_MIME_TYPE,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        stream_id: str | None = None,
        wait_delivered: bool = False,
    ) -> ByteStreamInfo:
        """Send a whole payload as a byte stream (one inline packet when every recipient reads v2).

        Args:
            data: The payload.
            name: A name for the payload (e.g. a file name).
            mime_type: The payload's content type.
            topic: The topic receivers' handlers are registered for.
            destination_identities: Recipients; empty for every participant.
            attributes: Stream attributes.
            stream_id: The stream id to use; a fresh UUID by default.
            wait_delivered: Return only once livekit-server has acknowledged the stream.

        Returns:
            The sent stream's information.

        Raises:
            StreamError: The header is too large.
            NotConnectedError: The room is not connected, or (with `wait_delivered`) the
                connection was lost before the server acknowledged the stream.
        """
        data = bytes(data)
        header = self._header(
            stream_id, topic=topic, mime_type=mime_type, attributes=attributes,
            total_size=len(data),
        )  # fmt: skip
        header.byte_header.name = name
        info = _info_from_header(header)
        delivery = await self._send_whole(
            header, data, destination_identities, text=False, track=wait_delivered
        )
        self.counters.inc("streams.sent")
        if delivery is not None:
            await delivery
        assert isinstance(info, ByteStreamInfo)
        return info

    async def send_file(
        self,
        file_path: str | os.PathLike[str],
        *,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        mime_type: str | None = None,
        name: str | None = None,
        on_progress: Callable[[float], None] | None = None,
        stream_id: str | None = None,
        wait_delivered: bool = False,
    ) -> ByteStreamInfo:
        """Send a file as a byte stream, read incrementally (header, chunks, trailer; no inline).

        Args:
            file_path: The file.
            topic: The topic receivers' handlers are registered for.
            destination_identities: Recipients; empty for every participant.
            attributes: Stream attributes.
            mime_type: Content type; guessed from the file name by default.
            name: Name sent to receivers; the file's base name by default.
            on_progress: Called with the fraction sent after each chunk; the last call is 1.0.
            stream_id: The stream id to use; a fresh UUID by default.
            wait_delivered: Return only once livekit-server has acknowledged the stream.

        Returns:
            The sent stream's information.

        Raises:
            StreamError: The file cannot be read or changed size while being sent, or the header
                is too large.
            NotConnectedError: The room is not connected.
        """
        self._check_open()
        path = os.fspath(file_path)
        try:
            size = (await asyncio.to_thread(os.stat, path)).st_size
        except OSError as exc:
            raise StreamError(f"send_file {path}: reading failed: {exc}") from exc
        file_name = name or os.path.basename(path) or "unknown"
        mime = mime_type or mimetypes.guess_type(file_name)[0] or BYTES_MIME_TYPE
        header = self._header(
            stream_id, topic=topic, mime_type=mime, attributes=attributes, total_size=size
        )
        header.byte_header.name = file_name
        info = _info_from_header(header)
        assert isinstance(info, ByteStreamInfo)
        stream = _Outgoing(self, header, destination_identities)
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except OSError as exc:
            raise StreamError(f"send_file {path}: reading failed: {exc}") from exc
        delivery: Delivery | None = None
        try:
            await stream.open()
            sent = 0
            while True:
                try:
                    block = await asyncio.to_thread(handle.read, _FILE_READ_BLOCK)
                except OSError as exc:
                    await stream.close_abnormally("sender could not read the file")
                    raise StreamError(f"send_file {path}: reading failed: {exc}") from exc
                if not block:
                    break
                if sent + len(block) > size:
                    await stream.close_abnormally("file grew while being sent")
                    raise StreamError(f"send_file {path}: sending failed: file grew while sent")
                for piece in _split_bytes(block):
                    await stream.send_chunk(piece)
                    sent += len(piece)
                    if on_progress is not None and sent < size:
                        self._progress(on_progress, sent / size, path)
            if sent != size:
                await stream.close_abnormally("file shrank while being sent")
                raise StreamError(f"send_file {path}: sending failed: file shrank while sent")
            delivery = await stream.close(track=wait_delivered)
        except BaseException as exc:
            if not isinstance(exc, StreamError):
                await stream.close_abnormally(f"sending failed: {type(exc).__name__}")
            raise
        finally:
            await asyncio.to_thread(handle.close)
        if delivery is not None:
            await delivery
        if on_progress is not None:
            self._progress(on_progress, 1.0, path)
        self.counters.inc("streams.sent")
        return info

    @staticmethod
    def _progress(callback: Callable[[float], None], value: float, path: str) -> None:
        try:
            callback(value)
        except Exception:
            logger.exception("send_file %s: progress callback failed", path)

    async def stream_bytes(
        self,
        name: str,
        *,
        total_size: int | None = None,
        mime_type: str = BYTES_MIME_TYPE,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        stream_id: str | None = None,
    ) -> ByteStreamWriter:
        """Open a byte stream to write incrementally (never inline, never compressed).

        Args:
            name: A name for the payload (e.g. a file name).
            total_size: Total bytes that will be written, if known.
            mime_type: The payload's content type.
            topic: The topic receivers' handlers are registered for.
            destination_identities: Recipients; empty for every participant.
            attributes: Stream attributes.
            stream_id: The stream id to use; a fresh UUID by default.

        Returns:
            A writer whose header has been sent.

        Raises:
            StreamError: The header is too large.
            NotConnectedError: The room is not connected.
        """
        header = self._header(
            stream_id, topic=topic, mime_type=mime_type, attributes=attributes,
            total_size=total_size,
        )  # fmt: skip
        header.byte_header.name = name
        info = _info_from_header(header)
        assert isinstance(info, ByteStreamInfo)
        stream = _Outgoing(self, header, destination_identities)
        await stream.open()
        self.counters.inc("streams.sent")
        return ByteStreamWriter(stream, info)


__all__ = [
    "BYTES_MIME_TYPE",
    "DEFAULT_MAX_BUFFERED_BYTES_PER_STREAM",
    "DEFAULT_MAX_BUFFERED_BYTES_TOTAL",
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "DEFAULT_STALL_TIMEOUT",
    "TEXT_MIME_TYPE",
    "ByteStreamHandler",
    "ByteStreamInfo",
    "ByteStreamReader",
    "ByteStreamWriter",
    "StreamInfo",
    "StreamManager",
    "TextStreamHandler",
    "TextStreamInfo",
    "TextStreamReader",
    "TextStreamWriter",
    "split_utf8",
]
