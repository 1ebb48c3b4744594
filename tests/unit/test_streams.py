"""Unit tests of `bridge.room.streams`: two stream managers joined by a fake transport."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit.protocol import models

from bridge.room.errors import DataPacketTooLargeError, StreamError
from bridge.room.streams import (
    ByteStreamReader,
    StreamManager,
    TextStreamReader,
    split_utf8,
)
from bridge.room.types import MAX_DATA_PACKET_BYTES, STREAM_CHUNK_SIZE, Counters

CAP_DEFLATE = models.ClientInfo.Capability.CAP_COMPRESSION_DEFLATE_RAW


class FakeTransport:
    """A `PacketTransport` that records packets and hands them to peer managers in order.

    Delivery is inline (the send awaits the receiver's `on_packet`), so receiver backpressure
    reaches the sender as it would through a real data channel.
    """

    def __init__(self, identity: str) -> None:
        self._identity = identity
        self._counters = Counters()
        self.sent: list[models.DataPacket] = []
        self.peers: dict[str, StreamManager] = {}
        self.participants: dict[str, models.ParticipantInfo] = {}

    @property
    def local_identity(self) -> str:
        return self._identity

    @property
    def counters(self) -> Counters:
        return self._counters

    async def send_packet(self, packet: models.DataPacket, *, reliable: bool = True) -> None:
        assert reliable, "every stream packet must go on the reliable channel"
        wire = packet.SerializeToString()
        if len(wire) > MAX_DATA_PACKET_BYTES:
            raise DataPacketTooLargeError(len(wire), MAX_DATA_PACKET_BYTES)
        self.sent.append(models.DataPacket.FromString(wire))
        received = models.DataPacket.FromString(wire)
        # The server fills in the sender, as livekit-server does.
        received.participant_identity = self._identity
        received.participant_sid = f"PA_{self._identity}"
        for identity, manager in self.peers.items():
            if packet.destination_identities and identity not in packet.destination_identities:
                continue
            await manager.on_packet(received)

    def participant_info(self, identity: str) -> models.ParticipantInfo | None:
        return self.participants.get(identity)

    def remote_identities(self) -> Sequence[str]:
        return list(self.participants)

    def add_remote(
        self, identity: str, *, client_protocol: int = 0, caps: Sequence[int] = ()
    ) -> None:
        self.participants[identity] = models.ParticipantInfo(
            identity=identity,
            sid=f"PA_{identity}",
            client_protocol=client_protocol,
            capabilities=list(caps),  # type: ignore[arg-type]
        )

    def kinds(self) -> list[str]:
        return [str(p.WhichOneof("value")) for p in self.sent]


class Pair:
    """Alice sends, Bob receives."""

    def __init__(
        self, *, client_protocol: int = 0, caps: Sequence[int] = (), **bob_options: Any
    ) -> None:
        self.alice_transport = FakeTransport("alice")
        self.bob_transport = FakeTransport("bob")
        self.alice = StreamManager(self.alice_transport)
        self.bob = StreamManager(self.bob_transport, **bob_options)
        self.alice_transport.peers["bob"] = self.bob
        self.alice_transport.add_remote("bob", client_protocol=client_protocol, caps=caps)
        self.bob_transport.add_remote("alice", client_protocol=2, caps=[CAP_DEFLATE])

    @property
    def counters(self) -> Counters:
        return self.bob_transport.counters

    async def aclose(self) -> None:
        await self.alice.aclose()
        await self.bob.aclose()


@pytest.fixture
async def pair() -> Any:
    p = Pair()
    yield p
    await p.aclose()


def text_collector(
    manager: StreamManager, topic: str = "chat"
) -> asyncio.Queue[tuple[TextStreamReader, str, str | BaseException]]:
    """Register a handler that reads each text stream whole and queues (reader, sender, result)."""
    results: asyncio.Queue[tuple[TextStreamReader, str, str | BaseException]] = asyncio.Queue()

    async def handler(reader: TextStreamReader, sender: str) -> None:
        try:
            results.put_nowait((reader, sender, await reader.read_all()))
        except StreamError as exc:
            results.put_nowait((reader, sender, exc))

    manager.register_text_stream_handler(topic, handler)
    return results


def byte_collector(
    manager: StreamManager, topic: str = "files"
) -> asyncio.Queue[tuple[ByteStreamReader, str, bytes | BaseException]]:
    results: asyncio.Queue[tuple[ByteStreamReader, str, bytes | BaseException]] = asyncio.Queue()

    async def handler(reader: ByteStreamReader, sender: str) -> None:
        try:
            results.put_nowait((reader, sender, await reader.read_all()))
        except StreamError as exc:
            results.put_nowait((reader, sender, exc))

    manager.register_byte_stream_handler(topic, handler)
    return results


async def get(queue: asyncio.Queue[Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        return await queue.get()


def header(
    stream_id: str,
    *,
    topic: str = "chat",
    text: bool = True,
    total: int | None = None,
    compression: int = 0,
    inline: bytes | None = None,
) -> models.DataPacket:
    h = models.DataStream.Header(stream_id=stream_id, topic=topic, timestamp=1)
    if text:
        h.text_header.SetInParent()
    else:
        h.byte_header.name = "blob"
    if total is not None:
        h.total_length = total
    h.compression = compression  # type: ignore[assignment]
    if inline is not None:
        h.inline_content = inline
    return models.DataPacket(participant_identity="alice", stream_header=h)


def chunk(stream_id: str, index: int, content: bytes, version: int = 0) -> models.DataPacket:
    return models.DataPacket(
        participant_identity="alice",
        stream_chunk=models.DataStream.Chunk(
            stream_id=stream_id, chunk_index=index, content=content, version=version
        ),
    )


def trailer(
    stream_id: str, reason: str = "", attributes: dict[str, str] | None = None
) -> models.DataPacket:
    return models.DataPacket(
        participant_identity="alice",
        stream_trailer=models.DataStream.Trailer(
            stream_id=stream_id, reason=reason, attributes=attributes or {}
        ),
    )


async def feed(manager: StreamManager, *packets: models.DataPacket) -> None:
    for packet in packets:
        await manager.on_packet(packet)


MIXED = "aé€😀中文ß𝄞 " * 7  # 1-, 2-, 3- and 4-byte characters


# ------------------------------------------------------------------------------------ v1 ----


async def test_send_text_small_round_trip_v1(pair: Pair) -> None:
    results = text_collector(pair.bob)
    before = int(time.time() * 1000)
    info = await pair.alice.send_text("hello", topic="chat", attributes={"k": "v"})
    reader, sender, text = await get(results)
    assert (sender, text) == ("alice", "hello")
    assert reader.info.stream_id == info.stream_id
    assert uuid.UUID(info.stream_id).version == 4
    assert reader.info.total_size == 5 and reader.info.mime_type == "text/plain"
    assert reader.info.attributes == {"k": "v"} and reader.info.topic == "chat"
    assert reader.progress == 1.0 and reader.bytes_received == 5
    assert pair.alice_transport.kinds() == ["stream_header", "stream_chunk", "stream_trailer"]
    sent_header = pair.alice_transport.sent[0].stream_header
    assert before <= sent_header.timestamp <= int(time.time() * 1000)
    assert not sent_header.HasField("inline_content")
    assert sent_header.compression == models.DataStream.NONE


async def test_send_text_one_megabyte_multibyte_v1(pair: Pair) -> None:
    results = text_collector(pair.bob)
    rng = random.Random(1)
    text = "".join(rng.choice(["a", "é", "€", "😀", "中", "𝄞"]) for _ in range(400_000))
    assert len(text.encode()) > 1_000_000
    await pair.alice.send_text(text, topic="chat")
    _, _, received = await get(results)
    assert received == text
    chunks = [p.stream_chunk for p in pair.alice_transport.sent if p.HasField("stream_chunk")]
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert len(c.content) <= STREAM_CHUNK_SIZE
        c.content.decode("utf-8")  # each chunk decodes on its own
    assert pair.alice_transport.sent[0].stream_header.total_length == len(text.encode())


async def test_stream_text_is_incremental(pair: Pair) -> None:
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    async def handler(reader: TextStreamReader, sender: str) -> None:
        async for piece in reader:
            pieces.put_nowait(piece)
        pieces.put_nowait(None)

    pair.bob.register_text_stream_handler("llm", handler)
    async with await pair.alice.stream_text(topic="llm", reply_to_id="prev") as writer:
        await writer.write("Hel")
        assert await get(pieces) == "Hel"  # arrives before the stream ends
        await writer.write("lo " + MIXED)
        assert await get(pieces) == "lo " + MIXED
    assert await get(pieces) is None
    assert writer.info.reply_to_id == "prev"
    assert pair.alice_transport.sent[0].stream_header.text_header.reply_to_stream_id == "prev"
    assert not pair.alice_transport.sent[0].stream_header.HasField("total_length")


async def test_send_bytes_round_trip_v1(pair: Pair) -> None:
    results = byte_collector(pair.bob)
    data = os.urandom(40_000)
    info = await pair.alice.send_bytes(data, name="x.bin", topic="files", mime_type="a/b")
    reader, _, received = await get(results)
    assert received == data
    assert reader.info.name == "x.bin" and reader.info.mime_type == "a/b"
    assert reader.info.stream_id == info.stream_id and reader.info.total_size == 40_000
    assert pair.alice_transport.kinds().count("stream_chunk") == 3


async def test_send_file_twenty_megabytes_incrementally(tmp_path: Path) -> None:
    limit = 256 * 1024
    pair = Pair(max_buffered_bytes_per_stream=limit)
    size = 20 * 1024 * 1024
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(size))
    peak = 0
    done: asyncio.Future[tuple[str, int, str]] = asyncio.get_running_loop().create_future()

    async def handler(reader: ByteStreamReader, sender: str) -> None:
        nonlocal peak
        digest = hashlib.sha256()
        count = 0
        async for piece in reader:
            peak = max(peak, pair.bob.buffered_bytes)
            digest.update(piece)
            count += len(piece)
            await asyncio.sleep(0)  # a slowish reader, so backpressure engages
        done.set_result((digest.hexdigest(), count, reader.info.name))

    pair.bob.register_byte_stream_handler("files", handler)
    progress: list[float] = []
    info = await pair.alice.send_file(path, topic="files", on_progress=progress.append)
    digest, count, name = await asyncio.wait_for(done, 30)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() and count == size
    assert name == "big.bin" and info.total_size == size and info.name == "big.bin"
    assert progress[-1] == 1.0 and progress.count(1.0) == 1
    assert progress == sorted(progress) and len(progress) > 100
    assert 0 < peak <= limit  # never held more than one reader's budget
    await pair.aclose()


async def test_send_file_empty_and_missing(pair: Pair, tmp_path: Path) -> None:
    results = byte_collector(pair.bob)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    progress: list[float] = []
    info = await pair.alice.send_file(empty, topic="files", on_progress=progress.append)
    _, _, data = await get(results)
    assert data == b"" and progress == [1.0] and info.mime_type == "text/plain"
    with pytest.raises(StreamError, match="reading failed"):
        await pair.alice.send_file(tmp_path / "nope", topic="files")


async def test_stream_bytes_round_trip(pair: Pair) -> None:
    results = byte_collector(pair.bob)
    async with await pair.alice.stream_bytes("b", total_size=30_001, topic="files") as writer:
        await writer.write(b"a" * 30_000)
        await writer.write(b"b")
    reader, _, data = await get(results)
    assert data == b"a" * 30_000 + b"b" and reader.info.total_size == 30_001
    async with await pair.alice.stream_bytes("open", topic="files") as writer:
        await writer.write(b"xyz")
    reader, _, data = await get(results)
    assert data == b"xyz" and reader.info.total_size is None and reader.progress is None


async def test_writer_rejects_more_than_announced_and_reports_short(pair: Pair) -> None:
    results = byte_collector(pair.bob)
    writer = await pair.alice.stream_bytes("b", total_size=4, topic="files")
    with pytest.raises(StreamError, match="exceed"):
        await writer.write(b"12345")
    await writer.write(b"12")
    with pytest.raises(StreamError, match="incomplete"):
        await writer.aclose()
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "incomplete: sent 2 of 4" in str(result)


# ------------------------------------------------------------------------------------ v2 ----


async def test_v2_inline_uncompressed_without_capability() -> None:
    pair = Pair(client_protocol=2)
    results = text_collector(pair.bob)
    await pair.alice.send_text("abc" * 100, topic="chat")
    assert pair.alice_transport.kinds() == ["stream_header"]
    sent = pair.alice_transport.sent[0].stream_header
    assert sent.inline_content == b"abc" * 100 and sent.compression == models.DataStream.NONE
    assert sent.total_length == 300
    _, _, text = await get(results)
    assert text == "abc" * 100
    await pair.aclose()


async def test_v2_inline_compressed_with_capability() -> None:
    pair = Pair(client_protocol=2, caps=[CAP_DEFLATE])
    results = text_collector(pair.bob)
    await pair.alice.send_text("abc" * 10_000, topic="chat")
    assert pair.alice_transport.kinds() == ["stream_header"]
    sent = pair.alice_transport.sent[0].stream_header
    assert sent.compression == models.DataStream.DEFLATE_RAW
    assert zlib.decompress(sent.inline_content, wbits=-15) == b"abc" * 10_000
    assert sent.total_length == 30_000
    _, _, text = await get(results)
    assert text == "abc" * 10_000
    await pair.aclose()


async def test_v2_incompressible_stays_uncompressed() -> None:
    pair = Pair(client_protocol=2, caps=[CAP_DEFLATE])
    results = byte_collector(pair.bob)
    data = os.urandom(1000)
    await pair.alice.send_bytes(data, topic="files")
    sent = pair.alice_transport.sent[0].stream_header
    assert pair.alice_transport.kinds() == ["stream_header"]
    assert sent.compression == models.DataStream.NONE and sent.inline_content == data
    assert (await get(results))[2] == data
    await pair.alice.send_bytes(b"", topic="files")  # empty payload: inline, present but empty
    assert pair.alice_transport.sent[-1].stream_header.HasField("inline_content")
    assert (await get(results))[2] == b""
    await pair.aclose()


async def test_v2_large_compressed_is_chunked() -> None:
    pair = Pair(client_protocol=2, caps=[CAP_DEFLATE])
    results = text_collector(pair.bob)
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "δέλτα", "😀", "中文", "epsilon"]
    text = " ".join(rng.choice(words) for _ in range(60_000))
    await pair.alice.send_text(text, topic="chat")
    kinds = pair.alice_transport.kinds()
    assert kinds[0] == "stream_header" and kinds[-1] == "stream_trailer"
    assert kinds.count("stream_chunk") >= 2
    sent = pair.alice_transport.sent[0].stream_header
    assert sent.compression == models.DataStream.DEFLATE_RAW
    assert not sent.HasField("inline_content") and sent.total_length == len(text.encode())
    compressed = b"".join(
        p.stream_chunk.content for p in pair.alice_transport.sent if p.HasField("stream_chunk")
    )
    assert len(compressed) < len(text.encode())
    assert zlib.decompress(compressed, wbits=-15) == text.encode()
    _, _, received = await get(results)
    assert received == text
    await pair.aclose()


async def test_v2_large_without_capability_is_plain_chunks() -> None:
    pair = Pair(client_protocol=2)
    results = byte_collector(pair.bob)
    data = b"z" * 50_000
    await pair.alice.send_bytes(data, topic="files")
    assert pair.alice_transport.kinds().count("stream_chunk") == 4
    assert pair.alice_transport.sent[0].stream_header.compression == models.DataStream.NONE
    assert (await get(results))[2] == data
    await pair.aclose()


async def test_v1_when_any_recipient_is_old_or_unknown() -> None:
    pair = Pair(client_protocol=2, caps=[CAP_DEFLATE])
    text_collector(pair.bob)
    pair.alice_transport.add_remote("carol", client_protocol=1)
    await pair.alice.send_text("hi", topic="chat")  # broadcast: carol is v1
    assert pair.alice_transport.kinds() == ["stream_header", "stream_chunk", "stream_trailer"]
    pair.alice_transport.sent.clear()
    await pair.alice.send_text("hi", topic="chat", destination_identities=["bob"])
    assert pair.alice_transport.kinds() == ["stream_header"]
    pair.alice_transport.sent.clear()
    await pair.alice.send_text("hi", topic="chat", destination_identities=["bob", "ghost"])
    assert len(pair.alice_transport.sent) == 3  # ghost is not in the room: assume v1
    assert list(pair.alice_transport.sent[0].destination_identities) == ["bob", "ghost"]
    await pair.aclose()


async def test_empty_room_counts_as_v2() -> None:
    transport = FakeTransport("alice")
    manager = StreamManager(transport)
    await manager.send_text("x" * 1000, topic="chat")
    assert transport.kinds() == ["stream_header"]
    assert transport.sent[0].stream_header.compression == models.DataStream.DEFLATE_RAW
    await manager.aclose()


async def test_stream_apis_never_compress() -> None:
    pair = Pair(client_protocol=2, caps=[CAP_DEFLATE])
    async with await pair.alice.stream_text(topic="chat") as writer:
        await writer.write("a" * 1000)
    assert pair.alice_transport.kinds() == ["stream_header", "stream_chunk", "stream_trailer"]
    assert pair.alice_transport.sent[0].stream_header.compression == models.DataStream.NONE
    assert pair.alice_transport.sent[1].stream_chunk.content == b"a" * 1000
    await pair.aclose()


async def test_header_too_large_sends_nothing() -> None:
    for client_protocol in (0, 2):
        pair = Pair(client_protocol=client_protocol, caps=[CAP_DEFLATE])
        big = {"k": "v" * 16_000}
        with pytest.raises(StreamError, match=r"header is .* bytes"):
            await pair.alice.send_text("x", topic="chat", attributes=big)
        with pytest.raises(StreamError, match="header is"):
            await pair.alice.send_bytes(b"x", topic="chat", attributes=big)
        with pytest.raises(StreamError, match="header is"):
            await pair.alice.stream_text(topic="chat", attributes=big)
        with pytest.raises(StreamError, match="header is"):
            await pair.alice.stream_bytes("n", topic="chat", attributes=big)
        assert pair.alice_transport.sent == []
        await pair.aclose()


async def test_send_text_with_attachments(pair: Pair, tmp_path: Path) -> None:
    texts = text_collector(pair.bob)
    files = byte_collector(pair.bob, topic="chat")
    one, two = tmp_path / "one.txt", tmp_path / "two.bin"
    one.write_bytes(b"first")
    two.write_bytes(os.urandom(20_000))
    info = await pair.alice.send_text("see attached", topic="chat", attachments=[one, two])
    reader, _, text = await get(texts)
    assert text == "see attached" and len(info.attached_stream_ids) == 2
    assert reader.info.attached_stream_ids == info.attached_stream_ids
    received = {}
    for _ in range(2):
        byte_reader, _, data = await get(files)
        received[byte_reader.info.stream_id] = (byte_reader.info.name, data)
    assert received[info.attached_stream_ids[0]] == ("one.txt", b"first")
    assert received[info.attached_stream_ids[1]] == ("two.bin", two.read_bytes())


# ----------------------------------------------------------------------------- receiving ----


async def test_decompress_chunked_stream_split_anywhere(pair: Pair) -> None:
    results = text_collector(pair.bob)
    text = MIXED * 500
    compressor = zlib.compressobj(wbits=-15)
    compressed = compressor.compress(text.encode()) + compressor.flush()
    cuts = [compressed[i : i + 333] for i in range(0, len(compressed), 333)]
    packets = [header("s1", total=len(text.encode()), compression=1)]
    packets += [chunk("s1", i, c) for i, c in enumerate(cuts)] + [trailer("s1")]
    await feed(pair.bob, *packets)
    assert (await get(results))[2] == text


async def test_inline_header_completes_immediately(pair: Pair) -> None:
    results = byte_collector(pair.bob)
    payload = b"hello " * 100
    compressed = zlib.compressobj(wbits=-15)
    inline = compressed.compress(payload) + compressed.flush()
    await feed(pair.bob, header("i1", text=False, topic="files", compression=1, inline=inline))
    reader, _, data = await get(results)
    assert data == payload and reader.bytes_received == len(payload)


async def test_decompression_bomb_is_capped() -> None:
    pair = Pair(max_decompressed_bytes=1024 * 1024)
    results = byte_collector(pair.bob)
    compressor = zlib.compressobj(9, wbits=-15)
    bomb = compressor.compress(b"\0" * (50 * 1024 * 1024)) + compressor.flush()
    assert len(bomb) < STREAM_CHUNK_SIZE * 10
    await feed(
        pair.bob, header("b1", text=False, topic="files", compression=1, inline=bomb[:14_000])
    )
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "limit" in str(result)
    assert pair.counters["streams.decompressed_too_large"] == 1
    assert pair.bob.buffered_bytes == 0
    await pair.aclose()


async def test_corrupt_compressed_stream_fails(pair: Pair) -> None:
    results = text_collector(pair.bob)
    await feed(pair.bob, header("c1", compression=1), chunk("c1", 0, b"\xff\xfe not deflate"))
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "decompression failed" in str(result)
    assert pair.counters["streams.decompress_failed"] == 1
    await feed(pair.bob, trailer("c1"))  # the rest of an aborted stream is dropped silently
    assert pair.counters["streams.unknown_stream"] == 0


async def test_unknown_compression_drops_stream(pair: Pair) -> None:
    text_collector(pair.bob)
    await feed(pair.bob, header("u1", compression=7), chunk("u1", 0, b"x"), trailer("u1"))
    assert pair.counters["streams.unknown_compression"] == 1
    assert pair.counters["streams.unknown_stream"] == 0


async def test_no_handler_drops_whole_stream_silently(pair: Pair) -> None:
    text_collector(pair.bob, topic="other")
    await feed(pair.bob, header("n1"), chunk("n1", 0, b"a"), chunk("n1", 1, b"b"), trailer("n1"))
    assert pair.counters["streams.no_handler"] == 1
    assert pair.counters["streams.unknown_stream"] == 0
    assert pair.counters["streams.received"] == 0
    await feed(pair.bob, header("n2", text=False, topic="other"))  # byte stream, text handler
    assert pair.counters["streams.no_handler"] == 2


async def test_chunk_gap_aborts(pair: Pair) -> None:
    results = text_collector(pair.bob)
    await feed(pair.bob, header("g1"), chunk("g1", 0, b"a"), chunk("g1", 2, b"c"))
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "expected chunk 1, got 2" in str(result)
    assert pair.counters["streams.chunk_gap"] == 1
    await feed(pair.bob, chunk("g1", 3, b"d"), trailer("g1"))
    assert pair.counters["streams.unknown_stream"] == 0


async def test_duplicate_chunk_is_dropped(pair: Pair) -> None:
    results = text_collector(pair.bob)
    packets = [header("d1", total=2), chunk("d1", 0, b"a"), chunk("d1", 0, b"X", version=1)]
    await feed(pair.bob, *packets, chunk("d1", 1, b"b"), trailer("d1"))
    assert (await get(results))[2] == "ab"
    assert pair.counters["streams.chunk_duplicate"] == 1


async def test_sender_leaves_mid_stream(pair: Pair) -> None:
    results = text_collector(pair.bob)
    await feed(pair.bob, header("l1"), chunk("l1", 0, b"partial"))
    pair.bob.on_participant_left("someone-else")
    assert results.empty()
    pair.bob.on_participant_left("alice")
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "left the room" in str(result)
    assert pair.counters["streams.sender_left"] == 1


async def test_abort_all_both_directions(pair: Pair) -> None:
    results = text_collector(pair.bob)
    await feed(pair.bob, header("a1"), chunk("a1", 0, b"x"))
    writer = await pair.alice.stream_text(topic="nobody")
    pair.bob.abort_all("room closed")
    pair.alice.abort_all("room closed")
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "room closed" in str(result)
    with pytest.raises(StreamError, match="room closed"):
        await writer.write("more")
    with pytest.raises(StreamError, match="room closed"):
        await writer.aclose()
    assert pair.counters["streams.aborted"] == 1
    # The manager keeps working after an abort (e.g. after a reconnection).
    await pair.alice.send_text("again", topic="chat")
    assert (await get(results))[2] == "again"


async def test_trailer_reason_and_context_manager_exception(pair: Pair) -> None:
    results = text_collector(pair.bob)
    writer = await pair.alice.stream_text(topic="chat")
    await writer.write("x")
    await writer.aclose("gave up")
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "abnormal end: gave up" in str(result)
    with pytest.raises(RuntimeError):
        async with await pair.alice.stream_text(topic="chat") as writer:
            raise RuntimeError("disk on fire")
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "RuntimeError: disk on fire" in str(result)
    assert pair.counters["streams.abnormal_end"] == 2


async def test_trailer_attributes_are_merged(pair: Pair) -> None:
    results = text_collector(pair.bob)
    writer = await pair.alice.stream_text(topic="chat", attributes={"a": "1", "b": "1"})
    await writer.write("t")
    await writer.aclose(attributes={"b": "2", "c": "3"})
    reader, _, text = await get(results)
    assert text == "t" and reader.info.attributes == {"a": "1", "b": "2", "c": "3"}


async def test_length_mismatch(pair: Pair) -> None:
    results = byte_collector(pair.bob)
    await feed(pair.bob, header("m1", text=False, topic="files", total=10))
    await feed(pair.bob, chunk("m1", 0, b"12345"), trailer("m1"))
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "received 5 of 10" in str(result)
    await feed(pair.bob, header("m2", text=False, topic="files", total=3))
    await feed(pair.bob, chunk("m2", 0, b"12345"))
    _, _, result = await get(results)
    assert isinstance(result, StreamError) and "more than the announced 3" in str(result)
    assert pair.counters["streams.length_mismatch"] == 2
    # total_length 0 means "unknown" for old JS byte streams: no error.
    await feed(pair.bob, header("m3", text=False, topic="files", total=0))
    await feed(pair.bob, chunk("m3", 0, b"data"), trailer("m3"))
    assert (await get(results))[2] == b"data"


async def test_duplicate_header_and_unknown_stream(pair: Pair) -> None:
    results = text_collector(pair.bob)
    await feed(pair.bob, header("h1"), chunk("h1", 0, b"a"), header("h1"))
    await feed(pair.bob, chunk("h1", 1, b"b"), trailer("h1"))
    assert (await get(results))[2] == "ab"
    assert pair.counters["streams.duplicate_header"] == 1
    await feed(pair.bob, chunk("nope", 0, b"x"), trailer("nope"))
    assert pair.counters["streams.unknown_stream"] == 2
    await feed(pair.bob, models.DataPacket(user=models.UserPacket(payload=b"x")))
    assert pair.counters["streams.not_a_stream_packet"] == 1
    bad = models.DataPacket(stream_header=models.DataStream.Header(stream_id="x", topic="chat"))
    await feed(pair.bob, bad)  # neither text nor byte header
    assert pair.counters["streams.malformed"] == 1


async def test_utf8_split_across_chunks_and_invalid_bytes(pair: Pair) -> None:
    results = text_collector(pair.bob)
    emoji = "😀".encode()
    await feed(pair.bob, header("u1"), chunk("u1", 0, b"a" + emoji[:2]), chunk("u1", 1, emoji[2:]))
    await feed(pair.bob, trailer("u1"))
    assert (await get(results))[2] == "a😀"
    assert pair.counters["streams.utf8_invalid"] == 0
    # Invalid bytes are replaced (like the JS SDK's non-fatal TextDecoder), counted once per stream.
    await feed(
        pair.bob, header("u2"), chunk("u2", 0, b"ab\xffcd\xc0"), chunk("u2", 1, b"e\xe2\x82")
    )
    await feed(pair.bob, trailer("u2"))
    assert (await get(results))[2] == "ab\ufffdcd\ufffde\ufffd"
    assert pair.counters["streams.utf8_invalid"] == 1


async def test_handler_exceptions_do_not_break_later_streams(pair: Pair) -> None:
    calls: list[str] = []

    def sync_handler(reader: TextStreamReader, sender: str) -> None:
        calls.append("sync")
        raise ValueError("sync boom")

    async def async_handler(reader: ByteStreamReader, sender: str) -> None:
        calls.append("async")
        if len(calls) < 3:
            raise ValueError("async boom")
        calls.append((await reader.read_all()).decode())

    pair.bob.register_text_stream_handler("chat", sync_handler)
    pair.bob.register_byte_stream_handler("files", async_handler)
    await pair.alice.send_text("x" * 50_000, topic="chat")  # not read: handler failed, dropped
    await pair.alice.send_bytes(b"y" * 50_000, topic="files")
    await pair.alice.send_bytes(b"ok", topic="files")
    async with asyncio.timeout(5):
        while len(calls) < 4:
            await asyncio.sleep(0.01)
    assert calls == ["sync", "async", "async", "ok"]
    assert pair.counters["streams.handler_failed"] == 2


async def test_register_twice_and_unregister(pair: Pair) -> None:
    results = text_collector(pair.bob)
    with pytest.raises(ValueError, match="chat"):
        pair.bob.register_text_stream_handler("chat", lambda r, s: None)
    pair.bob.register_byte_stream_handler("chat", lambda r, s: None)  # other kind: fine
    pair.bob.unregister_text_stream_handler("chat")
    await pair.alice.send_text("lost", topic="chat")
    assert results.empty() and pair.counters["streams.no_handler"] == 1


# -------------------------------------------------------------------------- backpressure ----


async def test_backpressure_waits_for_the_reader() -> None:
    limit = 64 * 1024
    pair = Pair(max_buffered_bytes_per_stream=limit, stall_timeout=None)
    kept: list[ByteStreamReader] = []
    pair.bob.register_byte_stream_handler("files", lambda reader, sender: kept.append(reader))
    await feed(pair.bob, header("p1", text=False, topic="files"))
    piece = b"x" * STREAM_CHUNK_SIZE
    index = 0
    while True:  # feed until on_packet blocks
        task = asyncio.create_task(pair.bob.on_packet(chunk("p1", index, piece)))
        await asyncio.sleep(0.05)
        index += 1
        if not task.done():
            break
        assert index < 20, "on_packet never applied backpressure"
    assert pair.bob.buffered_bytes <= limit
    assert index == limit // STREAM_CHUNK_SIZE + 1
    reader = kept[0]
    assert await reader.__anext__() == piece  # reading frees room
    await asyncio.wait_for(task, 1)
    await feed(pair.bob, trailer("p1"))
    rest = await reader.read_all()
    assert len(rest) == (index - 1) * STREAM_CHUNK_SIZE
    await pair.aclose()


async def test_unread_reader_is_dropped_not_waited_for() -> None:
    pair = Pair(max_buffered_bytes_per_stream=32 * 1024, stall_timeout=None)

    async def ignoring_handler(reader: ByteStreamReader, sender: str) -> None:
        return None

    pair.bob.register_byte_stream_handler("files", ignoring_handler)
    results = text_collector(pair.bob)
    await asyncio.wait_for(pair.alice.send_bytes(os.urandom(1_000_000), topic="files"), 5)
    assert pair.counters["streams.unread_dropped"] == 1
    assert pair.bob.buffered_bytes == 0
    await pair.alice.send_text("next", topic="chat")  # the dispatcher is not stuck
    assert (await get(results))[2] == "next"
    await pair.aclose()


async def test_stalled_reader_is_dropped_after_timeout() -> None:
    pair = Pair(max_buffered_bytes_per_stream=32 * 1024, stall_timeout=0.3)
    kept: list[TextStreamReader] = []
    pair.bob.register_text_stream_handler("chat", lambda reader, sender: kept.append(reader))
    started = time.monotonic()
    await asyncio.wait_for(pair.alice.send_text("s" * 200_000, topic="chat"), 5)
    assert time.monotonic() - started >= 0.25
    assert pair.counters["streams.stalled_dropped"] == 1
    assert pair.bob.buffered_bytes == 0
    with pytest.raises(StreamError, match="not read for"):
        await kept[0].read_all()
    await pair.aclose()


async def test_reader_close_drops_the_rest(pair: Pair) -> None:
    kept: list[TextStreamReader] = []
    pair.bob.register_text_stream_handler("chat", lambda reader, sender: kept.append(reader))
    await feed(pair.bob, header("r1"), chunk("r1", 0, b"a"))
    kept[0].close()
    await feed(pair.bob, chunk("r1", 1, b"b"), trailer("r1"))
    assert pair.counters["streams.reader_closed"] == 1 and pair.bob.buffered_bytes == 0
    with pytest.raises(StreamError, match="closed"):
        await kept[0].read_all()


async def test_read_all_max_size(pair: Pair) -> None:
    outcome: asyncio.Queue[BaseException | str] = asyncio.Queue()

    async def handler(reader: TextStreamReader, sender: str) -> None:
        try:
            outcome.put_nowait(await reader.read_all(max_size=20_000))
        except StreamError as exc:
            outcome.put_nowait(exc)

    pair.bob.register_text_stream_handler("chat", handler)
    await pair.alice.send_text("q" * 40_000, topic="chat")
    result = await get(outcome)
    assert isinstance(result, StreamError) and "over 20000 bytes" in str(result)


async def test_aclose_cancels_handler_tasks() -> None:
    pair = Pair()
    cancelled = asyncio.Event()

    async def handler(reader: TextStreamReader, sender: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    pair.bob.register_text_stream_handler("chat", handler)
    await pair.alice.send_text("x", topic="chat")
    await asyncio.sleep(0)
    await pair.bob.aclose()
    assert cancelled.is_set()
    with pytest.raises(StreamError, match="closed"):
        await pair.bob.send_text("x")
    await pair.alice.aclose()


# ---------------------------------------------------------------------------- utf-8 split ----


@settings(max_examples=200, deadline=None)
@given(text=st.text(), limit=st.sampled_from([4, 5, 7, 16, 100, STREAM_CHUNK_SIZE]))
def test_split_utf8_property(text: str, limit: int) -> None:
    data = text.encode()
    pieces = list(split_utf8(data, limit))
    assert all(0 < len(p) <= limit for p in pieces)
    assert "".join(p.decode("utf-8") for p in pieces) == text


@settings(max_examples=50, deadline=None)
@given(
    prefix=st.text(max_size=5), base=st.text(min_size=1, max_size=40), repeat=st.integers(1, 3000)
)
def test_split_utf8_property_large(prefix: str, base: str, repeat: int) -> None:
    text = prefix + base * repeat  # often over one chunk, with boundaries at every offset
    data = text.encode()
    pieces = list(split_utf8(data))
    assert all(len(p) <= STREAM_CHUNK_SIZE for p in pieces)
    assert "".join(p.decode("utf-8") for p in pieces) == text


def test_split_utf8_rejects_tiny_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        list(split_utf8(b"abc", 3))


async def test_total_buffer_cap_applies_across_streams() -> None:
    pair = Pair(
        max_buffered_bytes_per_stream=1024 * 1024,
        max_buffered_bytes_total=40_000,
        stall_timeout=None,
    )
    kept: list[ByteStreamReader] = []
    pair.bob.register_byte_stream_handler("files", lambda reader, sender: kept.append(reader))
    piece = b"x" * 15_000
    await feed(pair.bob, header("t1", text=False, topic="files"), chunk("t1", 0, piece))
    await feed(pair.bob, chunk("t1", 1, piece))
    await feed(pair.bob, header("t2", text=False, topic="files"), chunk("t2", 0, piece))
    assert pair.bob.buffered_bytes == 45_000  # an empty reader always gets its first piece
    blocked = asyncio.create_task(pair.bob.on_packet(chunk("t2", 1, piece)))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # over the total, though t2 alone is far below its own limit
    await kept[0].__anext__()  # 30,000 + 15,000 is still over the total
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await kept[0].__anext__()  # any reader consuming frees room
    await asyncio.wait_for(blocked, 1)
    assert pair.bob.buffered_bytes == 30_000
    await pair.aclose()


async def test_too_many_open_streams() -> None:
    pair = Pair(max_open_incoming_streams=2)
    kept: list[TextStreamReader] = []
    pair.bob.register_text_stream_handler("chat", lambda reader, sender: kept.append(reader))
    await feed(pair.bob, header("o1"), header("o2"), header("o3"), chunk("o3", 0, b"x"))
    assert len(kept) == 2 and pair.counters["streams.too_many_open"] == 1
    assert pair.counters["streams.unknown_stream"] == 0
    await pair.aclose()


async def test_agent_sending_on_behalf_then_leaving(pair: Pair) -> None:
    results = text_collector(pair.bob)
    on_behalf = header("ob1")
    on_behalf.participant_identity = "user"  # the server keeps an agent's on-behalf identity
    agent_chunk = chunk("ob1", 0, b"hi")
    agent_chunk.participant_identity = "agent"  # ...but stamps chunks with the agent's own
    await feed(pair.bob, on_behalf, agent_chunk)
    pair.bob.on_participant_left("agent")
    _, sender, result = await get(results)
    assert sender == "user" and isinstance(result, StreamError)
