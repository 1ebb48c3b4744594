"""Text and byte streams between our participant and official-SDK peers, both directions.

Each test runs a real livekit-server with official-SDK peers (`livekit.rtc`, Rust core) and our
`Room`. Spies on our side record which wire path a stream took (inline header, deflate-raw
compressed chunks, plain chunks), so the v2 paths and the plain chunked path are each proven:

* ours -> SDK: the SDK advertises client_protocol 2 and deflate-raw, so `send_text`/`send_bytes`
  go inline or compressed; `send_file`, `stream_text` and `stream_bytes` are always plain chunks;
  the plain path of `send_text` is forced by making our manager believe the SDK is a v1 peer.
* SDK -> ours: with our default options the SDK sends v2 (inline, compressed); with
  ``RoomOptions(client_protocol=0, capabilities=[])`` it must send plain chunks.

Throughput of the 20 MB transfers is printed (run with ``-s`` to see it), not asserted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from livekit import rtc
from livekit.protocol import models

from bridge.room.errors import StreamError
from bridge.room.room import Room, RoomOptions
from bridge.room.streams import ByteStreamReader, TextStreamReader
from tests.conftest import make_token
from tests.interop.conftest import eventually, our_peer, sdk_peer
from tests.services import LiveKitServer

MB = 1024 * 1024
DEFLATE_RAW = models.DataStream.DEFLATE_RAW
PLAIN_OPTIONS = RoomOptions(client_protocol=0, capabilities=[])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Received:
    """One stream a handler got: who sent it, its info, the pieces read and how it ended."""

    sender: str
    info: Any
    pieces: list[Any] = field(default_factory=list)
    progress: list[float | None] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    error: BaseException | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float = 0.0

    async def finished(self, timeout: float = 30.0) -> Received:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


class Collector:
    """A stream handler (for our `Room` or an SDK room) that reads each stream incrementally.

    Args:
        keep: Keep the pieces (False: only hash and count them, for large transfers).
    """

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.arrived: asyncio.Queue[Received] = asyncio.Queue()
        self.all: list[Received] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, reader: Any, sender: str) -> None:
        got = Received(sender=sender, info=reader.info)
        self.all.append(got)
        self.arrived.put_nowait(got)
        task = asyncio.get_running_loop().create_task(self._read(reader, got))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, reader: Any, got: Received) -> None:
        try:
            async for piece in reader:
                if self.keep:
                    got.pieces.append(piece)
                got.digest.update(piece if isinstance(piece, bytes) else piece.encode())
                got.size += len(piece)
                got.progress.append(getattr(reader, "progress", None))
        except Exception as exc:  # noqa: BLE001 - the test inspects whatever the reader raised
            got.error = exc
        finally:
            got.info = reader.info  # trailer attributes are merged in at the end
            got.ended_at = time.monotonic()
            got.done.set()

    async def next(self, timeout: float = 20.0) -> Received:
        return await asyncio.wait_for(self.arrived.get(), timeout)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def collectors() -> AsyncIterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(*, keep: bool = True) -> Collector:
        made.append(Collector(keep=keep))
        return made[-1]

    yield make
    for collector in made:
        await collector.aclose()


@dataclass
class WireLog:
    """Stream packets seen on our side: headers by id, chunk counts and bytes, trailers."""

    headers: dict[str, models.DataStream.Header] = field(default_factory=dict)
    chunks: Counter[str] = field(default_factory=Counter)
    chunk_bytes: Counter[str] = field(default_factory=Counter)
    trailers: dict[str, models.DataStream.Trailer] = field(default_factory=dict)
    destinations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    chunk_order: list[str] = field(default_factory=list)  # stream id of each chunk, in order

    def record(self, packet: models.DataPacket) -> None:
        which = packet.WhichOneof("value")
        if which == "stream_header":
            header = models.DataStream.Header()
            header.CopyFrom(packet.stream_header)
            self.headers[header.stream_id] = header
            self.destinations[header.stream_id] = tuple(packet.destination_identities)
        elif which == "stream_chunk":
            self.chunks[packet.stream_chunk.stream_id] += 1
            self.chunk_order.append(packet.stream_chunk.stream_id)
            self.chunk_bytes[packet.stream_chunk.stream_id] += len(packet.stream_chunk.content)
        elif which == "stream_trailer":
            trailer = models.DataStream.Trailer()
            trailer.CopyFrom(packet.stream_trailer)
            self.trailers[trailer.stream_id] = trailer

    def path(self, stream_id: str) -> str:
        """``inline``, ``inline+deflate``, ``chunks+deflate`` or ``chunks``."""
        header = self.headers[stream_id]
        kind = "inline" if header.HasField("inline_content") else "chunks"
        if header.HasField("inline_content"):
            assert self.chunks[stream_id] == 0 and stream_id not in self.trailers
        else:
            assert stream_id in self.trailers, "a chunked stream ends with a trailer"
        return kind + ("+deflate" if header.compression == DEFLATE_RAW else "")


def spy_received(ours: Room, monkeypatch: pytest.MonkeyPatch) -> WireLog:
    """Record every stream packet our room hands to its stream manager."""
    log = WireLog()
    manager = ours._streams
    original = manager.on_packet

    async def on_packet(packet: models.DataPacket) -> None:
        log.record(packet)
        await original(packet)

    monkeypatch.setattr(manager, "on_packet", on_packet)
    return log


def spy_sent(ours: Room, monkeypatch: pytest.MonkeyPatch) -> WireLog:
    """Record every stream packet our room sends."""
    log = WireLog()
    original = ours.send_packet

    async def send_packet(packet: models.DataPacket, *, reliable: bool = True) -> None:
        await original(packet, reliable=reliable)
        log.record(packet)

    monkeypatch.setattr(ours, "send_packet", send_packet)
    return log


def spy_sdk_text_headers(sdk: rtc.Room, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The SDK's raw text stream infos (its `TextStreamInfo` drops `reply_to_stream_id`)."""
    infos: list[Any] = []
    original = sdk._handle_text_stream_opened

    def opened(event: Any) -> None:
        infos.append(event.reader.info)
        original(event)

    monkeypatch.setattr(sdk, "_handle_text_stream_opened", opened)
    return infos


async def see_each_other(ours: Room, *sdks: rtc.Room) -> None:
    """Wait until our room knows every SDK peer and every SDK peer knows us.

    Both sides choose the v2 paths from the recipients' ParticipantInfo, and the SDK attributes
    streams only to participants it knows.
    """
    ours_id = ours.local_participant.identity
    await eventually(
        lambda: (
            all(s.local_participant.identity in ours.remote_participants for s in sdks)
            and all(ours_id in s.remote_participants for s in sdks)
        ),
        what="peers see each other",
    )


def mixed_text(size: int, seed: int = 7) -> str:
    """About `size` UTF-8 bytes of ASCII, accented letters, CJK and emoji (1 to 4 bytes each)."""
    rng = random.Random(seed)
    alphabets = [
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?\n",
        "éèêëàâäîïôöùûüçñÉÀÇÑßøåæœ",
        "漢字仮名交じり文日本語中文字符测试数据한국어텍스트",
        "😀😃😄😁🚀🌍🎉👍🔥💡🧪🐍",
    ]
    parts: list[str] = []
    total = 0
    while total < size:
        alphabet = alphabets[rng.randrange(4)]
        run = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        parts.append(run)
        total += len(run.encode())
    return "".join(parts)


def random_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path`; returns their SHA-256 hex digest."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def report(what: str, nbytes: int, seconds: float) -> None:
    print(f"\n[throughput] {what}: {nbytes / MB:.1f} MB in {seconds:.2f} s = "
          f"{nbytes / MB / seconds:.2f} MB/s")  # fmt: skip


def force_v1_sends(ours: Room, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make our manager treat every recipient as a v1 peer (no inline, no compression)."""

    def v1(destinations: Sequence[str]) -> tuple[bool, bool]:
        return False, False

    monkeypatch.setattr(ours._streams, "_v2_support", v1)


# --------------------------------------------------------------------------------------------
# 20 MB files
# --------------------------------------------------------------------------------------------


async def test_file_20mb_ours_to_sdk(
    livekit_server: LiveKitServer,
    room_name: str,
    tmp_path: Path,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = 20 * MB
    path = tmp_path / "payload.bin"
    digest = random_file(path, size)
    files = collectors(keep=False)
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        sdk.register_byte_stream_handler("files", files)
        await see_each_other(ours, sdk)
        sent = spy_sent(ours, monkeypatch)
        progress: list[float] = []
        started = time.monotonic()
        info = await ours.local_participant.send_file(
            path,
            topic="files",
            name="report.dat",
            mime_type="application/x-roombus-test",
            attributes={"kind": "random", "size": str(size)},
            on_progress=progress.append,
        )
        got = await (await files.next()).finished(timeout=120)
        report("ours -> SDK send_file", size, got.ended_at - started)

    assert got.error is None
    assert got.sender == "ours"
    assert got.size == size
    assert got.digest.hexdigest() == digest
    assert got.info.stream_id == info.stream_id
    assert got.info.name == "report.dat"
    assert got.info.mime_type == "application/x-roombus-test"
    assert got.info.size == size
    assert got.info.topic == "files"
    assert got.info.attributes == {"kind": "random", "size": str(size)}
    assert progress[-1] == 1.0
    assert progress == sorted(progress)
    assert sent.path(info.stream_id) == "chunks"
    assert sent.chunks[info.stream_id] == -(-size // 15_000)


@pytest.mark.parametrize("options", [None, PLAIN_OPTIONS], ids=["v2", "plain"])
async def test_file_20mb_sdk_to_ours(
    livekit_server: LiveKitServer,
    room_name: str,
    tmp_path: Path,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
    options: RoomOptions | None,
) -> None:
    size = 20 * MB
    path = tmp_path / "archive.bin"
    digest = random_file(path, size)
    files = collectors(keep=False)
    async with (
        our_peer(
            livekit_server, room_name, "ours", options,
            setup=lambda room: room.register_byte_stream_handler("files", files),
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):  # fmt: skip
        wire = spy_received(ours, monkeypatch)
        await see_each_other(ours, sdk)
        started = time.monotonic()
        info = await sdk.local_participant.send_file(
            str(path), topic="files", attributes={"origin": "sdk"}
        )
        got = await (await files.next()).finished(timeout=120)
        report(f"SDK -> ours send_file ({wire.path(info.stream_id)})", size, got.ended_at - started)

    assert got.error is None, got.error
    assert got.sender == "sdk"
    assert got.size == size
    assert got.digest.hexdigest() == digest
    assert isinstance(got.info.stream_id, str) and got.info.stream_id == info.stream_id
    assert got.info.name == "archive.bin"
    assert got.info.mime_type == "application/octet-stream"
    assert got.info.total_size == size
    assert got.info.attributes == {"origin": "sdk"}
    # Read incrementally: many pieces, progress rising to exactly 1.0.
    assert len(got.progress) > 100
    assert got.progress == sorted(got.progress)  # type: ignore[type-var]
    assert got.progress[-1] == 1.0
    assert ours.counters["streams.length_mismatch"] == 0
    if options is PLAIN_OPTIONS:
        assert wire.path(info.stream_id) == "chunks"


# --------------------------------------------------------------------------------------------
# Whole texts: 1 MB multi-byte, small (inline), compressible (deflate), forced plain chunks
# --------------------------------------------------------------------------------------------

BIG_TEXT = mixed_text(1 * MB)
SMALL_TEXT = "héllo 世界 👋 — short enough for one packet"
# Compresses to a few hundred bytes: one inline packet, deflated.
REPETITIVE_TEXT = "The quick brown fox jumps over the lazy dog. Ça va? 日本 🦊\n" * 2_000
# Compresses to well over one packet: deflated chunks. Lines vary, so deflate cannot collapse it.
COMPRESSIBLE_TEXT = "".join(
    f"line {i:07d}: temperature={i % 97}.{i % 10} status={'ok' if i % 3 else 'warn'} ✓\n"
    for i in range(40_000)
)

TEXT_CASES = [
    # (text, path when ours sends to an SDK peer, force v1 on our side)
    (SMALL_TEXT, "inline", False),
    (REPETITIVE_TEXT, "inline+deflate", False),
    (COMPRESSIBLE_TEXT, "chunks+deflate", False),
    (BIG_TEXT, "chunks+deflate", False),
    (BIG_TEXT, "chunks", True),
    (SMALL_TEXT, "chunks", True),
]


async def test_send_text_ours_to_sdk(
    livekit_server: LiveKitServer,
    room_name: str,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = collectors()
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        sdk.register_text_stream_handler("chat", texts)
        await see_each_other(ours, sdk)
        sent = spy_sent(ours, monkeypatch)
        for n, (text, path, v1) in enumerate(TEXT_CASES):
            with monkeypatch.context() as patch:
                if v1:
                    force_v1_sends(ours, patch)
                info = await ours.local_participant.send_text(
                    text, topic="chat", attributes={"case": str(n)}
                )
            got = await (await texts.next()).finished()
            case = f"case {n} ({path}, {len(text.encode())} bytes)"
            assert got.error is None, (case, got.error)
            assert got.text == text, case
            assert got.sender == "ours"
            assert got.info.stream_id == info.stream_id
            assert got.info.size == len(text.encode())
            assert got.info.attributes == {"case": str(n)}
            assert got.info.mime_type == "text/plain"
            assert sent.path(info.stream_id) == path, case
            size = len(text.encode())
            if path == "chunks":  # cut on character boundaries: at most 15,000 bytes each
                assert sent.chunk_bytes[info.stream_id] == size, case
                assert sent.chunks[info.stream_id] >= -(-size // 15_000), case
            elif path == "chunks+deflate":
                assert 0 < sent.chunk_bytes[info.stream_id] < size, case


SDK_TEXT_CASES = [
    # (text, path the SDK takes to us with: default options, v2 without deflate, v0)
    (SMALL_TEXT, ("inline", "inline", "chunks")),
    (REPETITIVE_TEXT, ("inline+deflate", "chunks", "chunks")),
    (COMPRESSIBLE_TEXT, ("chunks+deflate", "chunks", "chunks")),
    (BIG_TEXT, ("chunks+deflate", "chunks", "chunks")),
]
RECEIVER_OPTIONS = [None, RoomOptions(capabilities=[]), PLAIN_OPTIONS]


@pytest.mark.parametrize("variant", [0, 1, 2], ids=["v2", "v2_no_deflate", "plain"])
async def test_send_text_sdk_to_ours(
    livekit_server: LiveKitServer,
    room_name: str,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
    variant: int,
) -> None:
    texts = collectors()
    async with (
        our_peer(
            livekit_server, room_name, "ours", RECEIVER_OPTIONS[variant],
            setup=lambda room: room.register_text_stream_handler("chat", texts),
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):  # fmt: skip
        wire = spy_received(ours, monkeypatch)
        await see_each_other(ours, sdk)
        for n, (text, paths) in enumerate(SDK_TEXT_CASES):
            path = paths[variant]
            info = await sdk.local_participant.send_text(
                text, topic="chat", attributes={"case": str(n)}, reply_to_id=f"earlier-{n}"
            )
            got = await (await texts.next()).finished()
            case = f"case {n} ({path}, {len(text.encode())} bytes)"
            assert got.error is None, (case, got.error)
            assert got.text == text, case
            assert got.sender == "sdk"
            assert got.info.stream_id == info.stream_id
            assert got.info.total_size == len(text.encode())
            assert got.info.attributes == {"case": str(n)}
            assert got.info.reply_to_id == f"earlier-{n}"
            assert got.progress[-1] == 1.0
            assert wire.path(info.stream_id) == path, case
    assert ours.counters["streams.utf8_invalid"] == 0
    assert ours.counters["streams.length_mismatch"] == 0


# --------------------------------------------------------------------------------------------
# Incremental streams
# --------------------------------------------------------------------------------------------


def has_pieces(got: Received, count: int) -> Callable[[], bool]:
    """A predicate: `got` has `count` pieces so far."""
    return lambda: len(got.pieces) == count


LLM_PIECES = ["Hel", "lo, ", "wörld", " — ", "世界", "は", " 🎉🎉", " done", "\n"]


async def test_stream_text_pieces_arrive_before_close_both_ways(
    livekit_server: LiveKitServer,
    room_name: str,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    to_sdk, to_ours = collectors(), collectors()
    async with (
        our_peer(
            livekit_server, room_name, "ours",
            setup=lambda room: room.register_text_stream_handler("llm", to_ours),
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):  # fmt: skip
        sdk.register_text_stream_handler("llm", to_sdk)
        raw_infos = spy_sdk_text_headers(sdk, monkeypatch)
        await see_each_other(ours, sdk)

        ours_writer = await ours.local_participant.stream_text(
            topic="llm", attributes={"model": "ours"}, reply_to_id="question-1"
        )
        sdk_writer = await sdk.local_participant.stream_text(
            topic="llm", attributes={"model": "sdk"}
        )
        at_sdk, at_ours = await to_sdk.next(), await to_ours.next()
        for n, piece in enumerate(LLM_PIECES, start=1):
            await ours_writer.write(piece)
            await sdk_writer.write(piece)
            # Each piece reaches the reader while the stream is still open.
            await eventually(has_pieces(at_sdk, n), what=f"piece {n} at the SDK")
            await eventually(has_pieces(at_ours, n), what=f"piece {n} at ours")
            await asyncio.sleep(0.05)
        # A write above one chunk is split on character boundaries and arrives whole.
        long_piece = "語" * 12_000  # 36,000 UTF-8 bytes: three chunks
        await ours_writer.write(long_piece)
        await sdk_writer.write(long_piece)
        assert not at_sdk.done.is_set() and not at_ours.done.is_set()
        await ours_writer.aclose(attributes={"finish_reason": "stop"})
        await sdk_writer.aclose(attributes={"finish_reason": "stop"})
        await at_sdk.finished()
        await at_ours.finished()

    for got in (at_sdk, at_ours):
        assert got.error is None, got.error
        assert got.pieces[: len(LLM_PIECES)] == LLM_PIECES
        assert got.text == "".join(LLM_PIECES) + long_piece
        assert got.info.attributes["finish_reason"] == "stop"
    assert at_sdk.info.attributes == {"model": "ours", "finish_reason": "stop"}
    assert at_ours.info.attributes == {"model": "sdk", "finish_reason": "stop"}
    assert at_sdk.info.stream_id == ours_writer.info.stream_id
    assert at_ours.info.stream_id == sdk_writer.info.stream_id
    assert [raw.reply_to_stream_id for raw in raw_infos] == ["question-1"]
    # Open-ended: no size announced, so no progress either.
    assert at_ours.info.total_size is None
    assert at_ours.progress[-1] is None


BYTE_WRITES = [b"\x00\x01\x02", os.urandom(40_000), b"", os.urandom(15_000), os.urandom(1)]
BYTE_TOTAL = sum(len(w) for w in BYTE_WRITES)


async def test_stream_bytes_with_and_without_total_size_both_ways(
    livekit_server: LiveKitServer, room_name: str, collectors: Callable[..., Collector]
) -> None:
    to_sdk, to_ours = collectors(), collectors()
    async with (
        our_peer(
            livekit_server, room_name, "ours",
            setup=lambda room: room.register_byte_stream_handler("blobs", to_ours),
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):  # fmt: skip
        sdk.register_byte_stream_handler("blobs", to_sdk)
        await see_each_other(ours, sdk)
        for total in (BYTE_TOTAL, None):
            name = f"blob-{total}.raw"
            ours_writer = await ours.local_participant.stream_bytes(
                name, total_size=total, mime_type="application/x-raw", topic="blobs",
                attributes={"total": str(total)},
            )  # fmt: skip
            sdk_writer = await sdk.local_participant.stream_bytes(
                name, total_size=total, mime_type="application/x-raw", topic="blobs",
                attributes={"total": str(total)},
            )  # fmt: skip
            for chunk in BYTE_WRITES:
                await ours_writer.write(chunk)
                await sdk_writer.write(chunk)
            await ours_writer.aclose()
            await sdk_writer.aclose()
            at_sdk = await (await to_sdk.next()).finished()
            at_ours = await (await to_ours.next()).finished()
            for got in (at_sdk, at_ours):
                assert got.error is None, (total, got.error)
                assert got.data == b"".join(BYTE_WRITES)
                assert got.info.name == name
                assert got.info.mime_type == "application/x-raw"
                assert got.info.attributes == {"total": str(total)}
            assert at_sdk.info.stream_id == ours_writer.info.stream_id
            assert at_ours.info.stream_id == sdk_writer.info.stream_id
            # The SDK reports an unknown size as 0.
            assert at_sdk.info.size == (total or 0)
            assert at_ours.info.total_size == total
            assert at_ours.progress[-1] == (1.0 if total else None)


# --------------------------------------------------------------------------------------------
# Attributes, replies, attachments, topics, destinations
# --------------------------------------------------------------------------------------------


async def test_attributes_reply_and_attachments_reach_the_sdk(
    livekit_server: LiveKitServer,
    room_name: str,
    tmp_path: Path,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image, notes = tmp_path / "photo.png", tmp_path / "notes.txt"
    image.write_bytes(os.urandom(50_000))
    notes.write_text("ünïcödé notes\n" * 100, encoding="utf-8")
    texts, files = collectors(), collectors()
    async with (
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
        our_peer(livekit_server, room_name, "ours") as ours,
    ):
        raw_infos = spy_sdk_text_headers(sdk, monkeypatch)
        sdk.register_text_stream_handler("chat", texts)
        sdk.register_byte_stream_handler("chat", files)
        await see_each_other(ours, sdk)
        attributes = {"lk.custom": "x", "ключ": "значение 值", "empty": ""}
        info = await ours.local_participant.send_text(
            "see attached ✓", topic="chat", attributes=attributes,
            reply_to_id="msg-0001", attachments=[image, notes],
        )  # fmt: skip
        text = await (await texts.next()).finished()
        attached = [await (await files.next()).finished() for _ in range(2)]

    assert text.text == "see attached ✓"
    assert text.info.attributes == attributes
    assert len(info.attached_stream_ids) == 2
    assert text.info.attachments == list(info.attached_stream_ids)
    (raw,) = raw_infos
    assert raw.reply_to_stream_id == "msg-0001"
    assert list(raw.attached_stream_ids) == list(info.attached_stream_ids)
    assert [a.info.stream_id for a in attached] == list(info.attached_stream_ids)
    assert [a.info.name for a in attached] == ["photo.png", "notes.txt"]
    assert [a.info.mime_type for a in attached] == ["image/png", "text/plain"]
    assert [a.data for a in attached] == [image.read_bytes(), notes.read_bytes()]
    assert all(a.error is None and a.sender == "ours" for a in attached)


async def test_topic_without_handler_is_dropped_both_ways(
    livekit_server: LiveKitServer,
    room_name: str,
    tmp_path: Path,
    collectors: Callable[..., Collector],
) -> None:
    blob = tmp_path / "unwanted.bin"
    blob.write_bytes(os.urandom(100_000))  # chunked: its chunks must be dropped quietly too
    to_sdk, to_ours = collectors(), collectors()
    async with (
        our_peer(
            livekit_server, room_name, "ours",
            setup=lambda room: room.register_text_stream_handler("chat", to_ours),
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):  # fmt: skip
        sdk.register_text_stream_handler("chat", to_sdk)
        await see_each_other(ours, sdk)
        for sender in (ours.local_participant, sdk.local_participant):
            await sender.send_text("nobody listens", topic="elsewhere")
            await sender.send_file(str(blob), topic="elsewhere")
            # A byte stream on a topic that only has a *text* handler is not handled either.
            await sender.send_file(str(blob), topic="chat")
            await sender.send_text("for the chat", topic="chat")
        at_sdk = await (await to_sdk.next()).finished()
        at_ours = await (await to_ours.next()).finished()
        await asyncio.sleep(0.3)  # anything wrongly delivered would show up by now

    assert at_sdk.text == at_ours.text == "for the chat"
    assert len(to_sdk.all) == len(to_ours.all) == 1
    assert ours.counters["streams.no_handler"] == 3
    assert ours.counters["streams.unknown_stream"] == 0
    assert ours.counters["streams.received"] == 1


async def test_destination_identities_both_ways(
    livekit_server: LiveKitServer,
    room_name: str,
    tmp_path: Path,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blob = tmp_path / "private.bin"
    blob.write_bytes(os.urandom(60_000))
    bob_texts, bob_files, carol_texts, carol_files, our_texts = (collectors() for _ in range(5))
    async with (
        our_peer(
            livekit_server, room_name, "ours",
            setup=lambda room: room.register_text_stream_handler("dm", our_texts),
        ) as ours,
        sdk_peer(livekit_server, room_name, "bob") as bob,
        sdk_peer(livekit_server, room_name, "carol") as carol,
    ):  # fmt: skip
        bob.register_text_stream_handler("dm", bob_texts)
        bob.register_byte_stream_handler("dm", bob_files)
        carol.register_text_stream_handler("dm", carol_texts)
        carol.register_byte_stream_handler("dm", carol_files)
        await see_each_other(ours, bob, carol)
        await eventually(lambda: "carol" in bob.remote_participants, what="bob sees carol")
        sent = spy_sent(ours, monkeypatch)

        small = await ours.local_participant.send_text(
            "psst bob", topic="dm", destination_identities=["bob"]
        )
        big = await ours.local_participant.send_text(
            BIG_TEXT, topic="dm", destination_identities=["bob"]
        )
        file = await ours.local_participant.send_file(
            blob, topic="dm", destination_identities=["bob"]
        )
        writer = await ours.local_participant.stream_text(
            topic="dm", destination_identities=["bob"]
        )
        await writer.write("streamed to bob")
        await writer.aclose()
        # Reliable delivery is ordered per sender: once carol has this later broadcast, the
        # earlier streams addressed to bob alone can no longer reach her.
        await ours.local_participant.send_text("hello all", topic="dm")
        # And the other way: bob to carol only, then to everyone; ours must get the latter only.
        await bob.local_participant.send_text(
            "psst carol", topic="dm", destination_identities=["carol"]
        )
        await bob.local_participant.send_text("bob to all", topic="dm")

        at_bob = [await (await bob_texts.next()).finished() for _ in range(4)]
        at_bob_file = await (await bob_files.next()).finished()
        at_carol = [await (await carol_texts.next()).finished() for _ in range(3)]
        at_ours = await (await our_texts.next()).finished()
        await asyncio.sleep(0.3)

    assert [g.text for g in at_bob] == ["psst bob", BIG_TEXT, "streamed to bob", "hello all"]
    assert at_bob_file.data == blob.read_bytes()
    assert at_bob_file.info.stream_id == file.stream_id
    assert sorted((g.sender, g.text) for g in at_carol) == [
        ("bob", "bob to all"), ("bob", "psst carol"), ("ours", "hello all"),
    ]  # fmt: skip
    assert carol_files.all == []
    assert at_ours.text == "bob to all" and len(our_texts.all) == 1
    for stream_id in (small.stream_id, big.stream_id, file.stream_id, writer.info.stream_id):
        assert sent.destinations[stream_id] == ("bob",)
    # v2 to bob alone: still inline / compressed (the decision looks only at the destinations).
    assert sent.path(small.stream_id) == "inline"
    assert sent.path(big.stream_id) == "chunks+deflate"


# --------------------------------------------------------------------------------------------
# Abnormal ends
# --------------------------------------------------------------------------------------------


async def test_sdk_sender_leaving_mid_stream_fails_our_reader(
    livekit_server: LiveKitServer, room_name: str, collectors: Callable[..., Collector]
) -> None:
    to_ours = collectors()
    async with our_peer(
        livekit_server, room_name, "ours",
        setup=lambda room: room.register_byte_stream_handler("upload", to_ours),
    ) as ours:  # fmt: skip
        sdk = rtc.Room()
        await sdk.connect(livekit_server.url, make_token(livekit_server, room_name, "leaver"))
        try:
            await see_each_other(ours, sdk)
            writer = await sdk.local_participant.stream_bytes(
                "upload.bin", total_size=10 * MB, topic="upload"
            )
            got = await to_ours.next()
            for _ in range(4):
                await writer.write(os.urandom(10_000))
            await eventually(lambda: got.size == 40_000, what="the first chunks at ours")
            assert not got.done.is_set()
        finally:
            await sdk.disconnect()
        await got.finished()

    assert isinstance(got.error, StreamError)
    assert "left the room" in str(got.error)
    assert got.size == 40_000  # what arrived was still delivered before the error
    assert ours.counters["streams.sender_left"] == 1


async def test_abnormal_close_reason_both_ways(
    livekit_server: LiveKitServer, room_name: str, collectors: Callable[..., Collector]
) -> None:
    to_sdk, to_ours = collectors(), collectors()
    async with (
        our_peer(
            livekit_server, room_name, "ours",
            setup=lambda room: room.register_text_stream_handler("llm", to_ours),
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):  # fmt: skip
        sdk.register_text_stream_handler("llm", to_sdk)
        await see_each_other(ours, sdk)
        ours_writer = await ours.local_participant.stream_text(topic="llm")
        sdk_writer = await sdk.local_participant.stream_text(topic="llm")
        await ours_writer.write("partial answer")
        await sdk_writer.write("partial answer")
        at_sdk, at_ours = await to_sdk.next(), await to_ours.next()
        await eventually(lambda: at_sdk.pieces == ["partial answer"], what="piece at the SDK")
        await eventually(lambda: at_ours.pieces == ["partial answer"], what="piece at ours")
        await ours_writer.aclose("user cancelled", attributes={"why": "cancel"})
        await sdk_writer.aclose(reason="sdk gave up", attributes={"why": "cancel"})
        await at_sdk.finished()
        await at_ours.finished()

    # The SDK reader raises its StreamError with our reason in the description, and merges the
    # trailer's attributes even though the stream failed.
    assert isinstance(at_sdk.error, rtc.StreamError)
    assert at_sdk.error.description == "stream closed abnormally: user cancelled"
    assert at_sdk.info.attributes == {"why": "cancel"}
    assert at_sdk.pieces == ["partial answer"]
    assert isinstance(at_ours.error, StreamError)
    assert "abnormal end: sdk gave up" in str(at_ours.error)
    assert at_ours.info.attributes == {"why": "cancel"}
    assert ours.counters["streams.abnormal_end"] == 1


async def test_our_failures_mid_stream_fail_the_sdk_reader(
    livekit_server: LiveKitServer, room_name: str, collectors: Callable[..., Collector]
) -> None:
    to_sdk = collectors()
    async with sdk_peer(livekit_server, room_name, "sdk") as sdk:
        sdk.register_text_stream_handler("llm", to_sdk)
        sdk.register_byte_stream_handler("upload", to_sdk)
        async with our_peer(livekit_server, room_name, "ours") as ours:
            await see_each_other(ours, sdk)
            # An exception inside the writer's `async with` ends the stream with its text.
            with pytest.raises(ValueError, match="model crashed"):
                async with await ours.local_participant.stream_text(topic="llm") as writer:
                    await writer.write("half an ans")
                    failed = await to_sdk.next()
                    await eventually(lambda: failed.size == 11, what="piece at the SDK")
                    raise ValueError("model crashed")
            await failed.finished()
            # Streams still open when we leave the room.
            text_writer = await ours.local_participant.stream_text(topic="llm")
            await text_writer.write("cut short")
            cut_text = await to_sdk.next()
            bytes_writer = await ours.local_participant.stream_bytes(
                "upload.bin", total_size=MB, topic="upload"
            )
            await bytes_writer.write(b"x" * 30_000)
            cut_bytes = await to_sdk.next()
            await eventually(lambda: cut_bytes.size == 30_000, what="bytes at the SDK")
        # The SDK fails the sender's open streams once the server reports that it left.
        await cut_text.finished()
        await cut_bytes.finished()

    assert isinstance(failed.error, rtc.StreamError)
    assert failed.error.description == "stream closed abnormally: ValueError: model crashed"
    assert failed.text == "half an ans"
    for cut in (cut_text, cut_bytes):
        assert isinstance(cut.error, rtc.StreamError)
        assert "ours unexpectedly disconnected" in cut.error.description
    with pytest.raises(StreamError):  # our writer is unusable once the room closed
        await bytes_writer.write(b"more")


# --------------------------------------------------------------------------------------------
# send_bytes and edge cases
# --------------------------------------------------------------------------------------------

BYTES_CASES = [
    # (payload, path ours -> SDK and SDK -> ours (v2))
    (b"", "inline"),
    (b"\x00\xff" * 100, "inline+deflate"),
    (os.urandom(10_000), "inline"),
    (os.urandom(100_000), "chunks"),
    (b"abc" * 100_000, "inline+deflate"),
    (bytes(range(256)) * 4 + os.urandom(200_000), "chunks+deflate"),
]


async def test_send_bytes_and_empty_streams_both_ways(
    livekit_server: LiveKitServer,
    room_name: str,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    to_sdk, to_ours = collectors(), collectors()
    texts_to_sdk, texts_to_ours = collectors(), collectors()

    def setup(room: Room) -> None:
        room.register_byte_stream_handler("bin", to_ours)
        room.register_text_stream_handler("txt", texts_to_ours)

    async with (
        our_peer(livekit_server, room_name, "ours", setup=setup) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        sdk.register_byte_stream_handler("bin", to_sdk)
        sdk.register_text_stream_handler("txt", texts_to_sdk)
        await see_each_other(ours, sdk)
        sent, received = spy_sent(ours, monkeypatch), spy_received(ours, monkeypatch)
        for n, (payload, path) in enumerate(BYTES_CASES):
            ours_info = await ours.local_participant.send_bytes(
                payload, name=f"case{n}", mime_type="application/x-case", topic="bin"
            )
            sdk_info = await sdk.local_participant.send_bytes(
                payload, name=f"case{n}", mime_type="application/x-case", topic="bin"
            )
            at_sdk = await (await to_sdk.next()).finished()
            at_ours = await (await to_ours.next()).finished()
            case = f"case {n} ({len(payload)} bytes, {path})"
            for got in (at_sdk, at_ours):
                assert got.error is None, (case, got.error)
                assert got.data == payload, case
                assert got.info.name == f"case{n}"
                assert got.info.mime_type == "application/x-case"
            assert at_sdk.info.size == at_ours.info.total_size == len(payload)
            assert at_sdk.info.stream_id == ours_info.stream_id
            assert at_ours.info.stream_id == sdk_info.stream_id
            assert sent.path(ours_info.stream_id) == path, case
            assert received.path(sdk_info.stream_id) == path, case

        # Empty texts, whole and streamed.
        await ours.local_participant.send_text("", topic="txt")
        await sdk.local_participant.send_text("", topic="txt")
        await (await ours.local_participant.stream_text(topic="txt")).aclose()
        await (await sdk.local_participant.stream_text(topic="txt")).aclose()
        empty = [await (await c.next()).finished() for c in (texts_to_sdk, texts_to_ours) * 2]

    for got in empty:
        assert got.error is None and got.text == ""
    now_ms = time.time() * 1000
    for got in [*to_sdk.all, *to_ours.all, *empty]:  # timestamps are milliseconds, both ways
        assert abs(got.info.timestamp - now_ms) < 60_000


# --------------------------------------------------------------------------------------------
# Concurrency and slow readers
# --------------------------------------------------------------------------------------------


async def test_concurrent_streams_interleave_both_ways(
    livekit_server: LiveKitServer,
    room_name: str,
    tmp_path: Path,
    collectors: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths = [tmp_path / f"file{n}.bin" for n in range(3)]
    digests = {p.name: random_file(p, 600_000) for p in paths}
    to_sdk, to_ours = collectors(keep=False), collectors(keep=False)
    async with (
        our_peer(
            livekit_server, room_name, "ours",
            setup=lambda room: room.register_byte_stream_handler("files", to_ours),
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):  # fmt: skip
        sdk.register_byte_stream_handler("files", to_sdk)
        await see_each_other(ours, sdk)
        sent, received = spy_sent(ours, monkeypatch), spy_received(ours, monkeypatch)
        await asyncio.gather(
            *(ours.local_participant.send_file(p, topic="files") for p in paths),
            *(sdk.local_participant.send_file(str(p), topic="files") for p in paths),
        )
        got = [await (await c.next()).finished() for c in (to_sdk, to_ours) for _ in paths]

    for g in got:
        assert g.error is None, g.error
        assert g.digest.hexdigest() == digests[g.info.name]
    # The chunks of the three streams really were interleaved on the wire, both ways.
    for log in (sent, received):
        switches = sum(a != b for a, b in zip(log.chunk_order, log.chunk_order[1:], strict=False))
        assert switches > 3


async def test_reader_slower_than_the_buffers_fails_the_stream_cleanly(
    livekit_server: LiveKitServer, room_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure ends at our room's inbox: aiortc cannot slow the sender down.

    A reader that falls behind by more than its buffer plus the room's stream inbox loses
    packets; the stream then fails with a chunk gap (never silently corrupt) and the room goes on.
    The limits are shrunk here to show it quickly; by default it takes about 4 MB per stream
    (or 64 MB in all) plus 4,096 packets (about 60 MB).
    """
    release = asyncio.Event()
    outcome: asyncio.Future[tuple[int, BaseException | None]] = (
        asyncio.get_running_loop().create_future()
    )
    texts: list[str] = []

    async def slow_reader(reader: ByteStreamReader, sender: str) -> None:
        await release.wait()
        size = 0
        try:
            async for piece in reader:
                size += len(piece)
        except StreamError as exc:
            outcome.set_result((size, exc))
            return
        outcome.set_result((size, None))

    async def on_text(reader: TextStreamReader, sender: str) -> None:
        texts.append(await reader.read_all())

    def setup(room: Room) -> None:
        room.register_byte_stream_handler("upload", slow_reader)
        room.register_text_stream_handler("chat", on_text)
        monkeypatch.setattr(room._streams, "_max_per_stream", 256 * 1024)

    async with (
        our_peer(
            livekit_server, room_name, "ours", RoomOptions(stream_queue_size=32), setup=setup
        ) as ours,
        sdk_peer(livekit_server, room_name, "sdk") as sdk,
    ):
        await see_each_other(ours, sdk)
        size = 4 * MB
        writer = await sdk.local_participant.stream_bytes(
            "big.bin", total_size=size, topic="upload"
        )
        for _ in range(size // 100_000):
            await writer.write(os.urandom(100_000))
        await writer.write(os.urandom(size % 100_000))
        await writer.aclose()
        await eventually(lambda: ours.counters["streams.inbox_dropped"] > 0, what="a drop")
        release.set()
        read, error = await asyncio.wait_for(outcome, 30)
        await sdk.local_participant.send_text("still alive", topic="chat")
        await eventually(lambda: texts == ["still alive"], what="the next stream")

    assert isinstance(error, StreamError)
    assert "chunk gap" in str(error)
    assert 0 < read < size
    assert ours.counters["streams.chunk_gap"] == 1
