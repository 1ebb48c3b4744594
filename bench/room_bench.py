"""Room-side data path benchmark: our participant against the official SDK, same run, same clock.

Starts its own livekit-server (inside the test network namespace) and measures, for reliable
256-byte data packets, the delivered message rate, latency (loaded: while saturating; paced: at a
low fixed rate) and the largest gap between consecutive deliveries; and byte-stream throughput
for one large file; and data-track frames (lossy: frames/s delivered and latency at a paced
rate, and the share lost). Each case is run SDK→SDK (the baseline, official SDK on both ends),
ours→SDK and SDK→ours; results are printed as a table with ratios to the baseline and
optionally written as JSON.

Run inside the namespace::

    scripts/netns .venv/bin/python -m bench.room_bench [--json out.json] [--duration 5]

Sender and receiver live in this one process, so a payload timestamp (perf_counter) gives the
one-way latency directly. The machine is shared: compare ratios within a run, not absolute
figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from livekit import api, rtc

from bridge.room import sctp
from bridge.room.data_tracks import DataTrackFrame, DataTrackFrameReceived
from bridge.room.events import DataReceived
from bridge.room.room import Room
from bridge.room.streams import ByteStreamReader
from tests.services import LiveKitServer

log = logging.getLogger("bench.room")

MESSAGE_SIZE = 256
TOPIC = "bench"
FILE_TOPIC = "bench-file"
TRACK = "bench-track"
# Header of every benchmark message: send time (perf_counter) and sequence number.
_HEAD = struct.Struct("!dI")

CASES = ("sdk->sdk", "ours->sdk", "sdk->ours", "ours->ours")


# ----------------------------------------------------------------------------- endpoints


class Sender(Protocol):
    async def send(self, payload: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def send_file(self, path: str) -> None: ...


class Receiver(Protocol):
    def on_message(self, callback: Callable[[bytes], None]) -> None: ...

    def on_file(self, callback: Callable[[AsyncIterator[bytes]], Awaitable[None]]) -> None: ...


class SdkEnd:
    """An official-SDK participant as sender or receiver.

    The SDK's `publish_data` resolves only after a round trip through its FFI, so awaiting each
    call would measure that round trip, not the data path. Up to `window` calls are kept in
    flight instead (each is issued to the FFI in call order when its task first runs).
    """

    def __init__(self, room: rtc.Room, window: int) -> None:
        self.room = room
        self._window = window
        self._pending: set[asyncio.Task[None]] = set()
        # Remote data tracks by (publisher, name), as the SDK announces them.
        self._tracks: dict[tuple[str, str], rtc.RemoteDataTrack] = {}
        self._reader: asyncio.Task[None] | None = None

        def published(track: rtc.RemoteDataTrack) -> None:
            self._tracks[(track.publisher_identity, track.info.name)] = track

        room.on("data_track_published", published)

    async def send(self, payload: bytes) -> None:
        publish = self.room.local_participant.publish_data(payload, topic=TOPIC)
        if self._window <= 1:
            await publish
            return
        while len(self._pending) >= self._window:
            done, self._pending = await asyncio.wait(
                self._pending, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()
        self._pending.add(asyncio.create_task(publish, name="bench-sdk-publish"))

    async def flush(self) -> None:
        """Wait for every send still in flight."""
        pending, self._pending = self._pending, set()
        for task in pending:
            await task

    async def send_file(self, path: str) -> None:
        # Random data does not compress; compressing it would only measure zlib.
        await self.room.local_participant.send_file(path, topic=FILE_TOPIC, compress=False)

    def on_message(self, callback: Callable[[bytes], None]) -> None:
        def handler(packet: rtc.DataPacket) -> None:
            if packet.topic == TOPIC:
                callback(packet.data)

        self.room.on("data_received", handler)

    def on_file(self, callback: Callable[[AsyncIterator[bytes]], Awaitable[None]]) -> None:
        tasks: set[asyncio.Task[None]] = set()

        def handler(reader: rtc.ByteStreamReader, _identity: str) -> None:
            task = asyncio.create_task(_consume(callback, reader), name="bench-sdk-file")
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        self.room.register_byte_stream_handler(FILE_TOPIC, handler)

    async def publish_track(self) -> Callable[[bytes], bool]:
        """Publish the bench's data track; a function that pushes one frame (False: refused)."""
        track = await self.room.local_participant.publish_data_track(name=TRACK)

        def push(payload: bytes) -> bool:
            try:
                track.try_push(rtc.DataTrackFrame(payload=payload))
            except Exception:  # noqa: BLE001 - the SDK's PushFrameError: refused, counted
                return False
            return True

        return push

    async def subscribe_track(self, publisher: str, callback: Callable[[bytes], None]) -> None:
        """Subscribe to `publisher`'s bench track (waits for its publication)."""
        deadline = time.monotonic() + 15
        while (publisher, TRACK) not in self._tracks:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench: no data track {TRACK!r} from {publisher} in 15 s")
            await asyncio.sleep(0.05)
        stream = self._tracks[(publisher, TRACK)].subscribe()

        async def read() -> None:
            async for frame in stream:
                callback(frame.payload)

        self._reader = asyncio.create_task(read(), name="bench-sdk-track")


async def _consume(
    callback: Callable[[AsyncIterator[bytes]], Awaitable[None]], reader: AsyncIterator[bytes]
) -> None:
    await callback(reader)


class OurEnd:
    """Our participant as sender or receiver."""

    def __init__(self, room: Room) -> None:
        self.room = room

    async def send(self, payload: bytes) -> None:
        await self.room.local_participant.publish_data(payload, topic=TOPIC)

    async def flush(self) -> None:
        """Nothing to wait for: `publish_data` returned once the channel accepted the packet."""

    async def send_file(self, path: str) -> None:
        await self.room.local_participant.send_file(path, topic=FILE_TOPIC)

    def on_message(self, callback: Callable[[bytes], None]) -> None:
        def handler(event: DataReceived) -> None:
            if event.packet.topic == TOPIC:
                callback(event.packet.data)

        self.room.on(DataReceived, handler)

    def on_file(self, callback: Callable[[AsyncIterator[bytes]], Awaitable[None]]) -> None:
        async def handler(reader: ByteStreamReader, _identity: str) -> None:
            await callback(reader)

        self.room.register_byte_stream_handler(FILE_TOPIC, handler)

    async def publish_track(self) -> Callable[[bytes], bool]:
        """Publish the bench's data track; a function that pushes one frame (False: refused)."""
        track = await self.room.local_participant.publish_data_track(TRACK)
        return lambda payload: track.try_push(DataTrackFrame(payload))

    async def subscribe_track(self, publisher: str, callback: Callable[[bytes], None]) -> None:
        """Subscribe to `publisher`'s bench track (now, or once it is published)."""

        def handler(event: DataTrackFrameReceived) -> None:
            callback(event.frame.payload)

        self.room.on(DataTrackFrameReceived, handler)
        self.room.subscribe_data_track(publisher, TRACK)


def token(server: LiveKitServer, room: str, identity: str) -> str:
    grants = api.VideoGrants(
        room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True
    )
    jwt: str = (
        api.AccessToken(server.api_key, server.api_secret)
        .with_identity(identity)
        .with_grants(grants)
        .to_jwt()
    )
    return jwt


@contextlib.asynccontextmanager
async def pair(
    server: LiveKitServer, case: str, sdk_window: int = 1
) -> AsyncIterator[tuple[Sender, Receiver, list[Room]]]:
    """A sender and a receiver in a fresh room, for `case` ("sdk->ours", ...)."""
    room_name = f"bench-{case.replace('->', '-to-')}-{uuid.uuid4().hex[:6]}"
    ends: list[SdkEnd | OurEnd] = []
    ours: list[Room] = []
    try:
        for role in case.split("->"):
            identity = f"{role}-{'tx' if not ends else 'rx'}"
            if role == "sdk":
                sdk_room = rtc.Room()
                await sdk_room.connect(server.url, token(server, room_name, identity))
                ends.append(SdkEnd(sdk_room, sdk_window))
            else:
                room = Room()
                await room.connect(server.url, token(server, room_name, identity))
                ours.append(room)
                ends.append(OurEnd(room))
        await _wait_visible(ends)
        yield ends[0], ends[1], ours
    finally:
        for end in reversed(ends):
            if isinstance(end, SdkEnd):
                await end.room.disconnect()
            else:
                await end.room.disconnect()


async def _wait_visible(ends: list[SdkEnd | OurEnd]) -> None:
    """Wait until each side sees the other (the SDK drops packets of unknown senders)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(len(end.room.remote_participants) >= 1 for end in ends):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("bench: participants did not see each other within 15 s")


# ----------------------------------------------------------------------------- messages


@dataclass
class MessageResult:
    case: str
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    out_of_order: int = 0
    rate: float = 0.0  # delivered messages per second, first send to last delivery
    send_rate: float = 0.0  # how fast the sender's API accepted them
    loaded_p50_ms: float = 0.0
    loaded_p99_ms: float = 0.0
    paced_p50_ms: float = 0.0
    paced_p99_ms: float = 0.0
    max_gap_ms: float = 0.0
    # Process CPU time (all threads: ours, the SDK's Rust side) per delivered message while
    # saturated: less sensitive to other load on the machine than the rates.
    cpu_us_per_msg: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)


class _Collector:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.arrivals: list[float] = []
        self.next_seq = 0
        self.out_of_order = 0
        self.seen = 0
        self.expect = 0
        self.first_seq = 0
        self.done = asyncio.Event()
        # Lossy (data tracks): a gap is a loss, only an older frame after a newer one is out of
        # order.
        self.lossy = False

    def reset(self, expect: int, first_seq: int) -> None:
        self.latencies.clear()
        self.arrivals.clear()
        self.seen = 0
        self.next_seq = first_seq
        self.first_seq = first_seq
        self.expect = expect
        self.done.clear()

    def __call__(self, data: bytes) -> None:
        now = time.perf_counter()
        sent_at, seq = _HEAD.unpack_from(data)
        if seq < self.first_seq:
            return  # a late message of an earlier phase
        if seq < self.next_seq if self.lossy else seq != self.next_seq:
            self.out_of_order += 1
        self.next_seq = max(self.next_seq, seq + 1) if self.lossy else seq + 1
        self.seen += 1
        self.latencies.append(now - sent_at)
        self.arrivals.append(now)
        if self.seen >= self.expect:
            self.done.set()


def _payload(seq: int, size: int = MESSAGE_SIZE) -> bytes:
    head = _HEAD.pack(time.perf_counter(), seq)
    return head + b"x" * (size - len(head))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def bench_messages(
    server: LiveKitServer, case: str, duration: float, drain_timeout: float, sdk_window: int
) -> MessageResult:
    result = MessageResult(case)
    async with pair(server, case, sdk_window) as (sender, receiver, ours):
        collect = _Collector()
        receiver.on_message(collect)
        seq = 0

        # Warm-up: connections, SCTP congestion window, JIT-less caches.
        collect.reset(500, seq)
        for _ in range(500):
            await sender.send(_payload(seq))
            seq += 1
        await sender.flush()
        await asyncio.wait_for(collect.done.wait(), drain_timeout)
        collect.out_of_order = 0

        # Paced: latency on an idle path (100 messages/s for 2 s).
        collect.reset(200, seq)
        for _ in range(200):
            await sender.send(_payload(seq))
            await sender.flush()
            seq += 1
            await asyncio.sleep(0.01)
        await asyncio.wait_for(collect.done.wait(), drain_timeout)
        result.paced_p50_ms = _pct(collect.latencies, 0.50)
        result.paced_p99_ms = _pct(collect.latencies, 0.99)

        # Saturated: send as fast as the sender's API allows for `duration` seconds.
        first = seq
        collect.reset(1 << 62, seq)
        cpu_start = time.process_time()
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            for _ in range(50):
                await sender.send(_payload(seq))
                seq += 1
        await sender.flush()
        sent_done = time.perf_counter()
        result.sent = seq - first
        collect.expect = result.sent
        if collect.seen >= collect.expect:
            collect.done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collect.done.wait(), drain_timeout)
        cpu = time.process_time() - cpu_start
        result.delivered = collect.seen
        result.cpu_us_per_msg = cpu / max(collect.seen, 1) * 1e6
        result.lost = result.sent - collect.seen
        result.out_of_order = collect.out_of_order
        result.send_rate = result.sent / (sent_done - start)
        if collect.arrivals:
            result.rate = collect.seen / (collect.arrivals[-1] - start)
            gaps = [b - a for a, b in zip(collect.arrivals, collect.arrivals[1:], strict=False)]
            result.max_gap_ms = max([collect.arrivals[0] - start, *gaps]) * 1000
        result.loaded_p50_ms = _pct(collect.latencies, 0.50)
        result.loaded_p99_ms = _pct(collect.latencies, 0.99)
        for room in ours:
            result.counters.update({k: v for k, v in room.counters.items() if v})
    return result


# ----------------------------------------------------------------------------- data tracks


@dataclass
class TrackResult:
    case: str
    offered: float = 0.0  # frames/s pushed
    pushed: int = 0
    refused: int = 0  # try_push said no (the sender's queue is full)
    received: int = 0
    lost_pct: float = 0.0  # of the frames pushed, not received (dropped on the way)
    rate: float = 0.0  # frames/s received over the push window
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    out_of_order: int = 0
    cpu_us_per_frame: float = 0.0


async def bench_data_track(
    server: LiveKitServer, case: str, rate: float, duration: float, size: int
) -> TrackResult:
    """Frames of `size` bytes pushed at `rate` per second for `duration` s on one data track.

    Data tracks are lossy: the server drops what would wait more than 100 ms; what counts is
    how many arrive and how late. A warm-up phase pushes until frames arrive (the subscription
    takes a round trip) and is not counted.
    """
    result = TrackResult(case, offered=rate)
    async with pair(server, case) as (sender, receiver, _ours):
        assert isinstance(sender, SdkEnd | OurEnd) and isinstance(receiver, SdkEnd | OurEnd)
        collect = _Collector()
        collect.lossy = True
        publisher = sender.room.local_participant.identity
        push = await sender.publish_track()
        await receiver.subscribe_track(publisher, collect)
        seq = 0
        collect.reset(1, 0)
        deadline = time.monotonic() + 15
        while not collect.seen and time.monotonic() < deadline:
            push(_payload(seq, size))
            seq += 1
            await asyncio.sleep(0.02)
        if not collect.seen:
            raise RuntimeError(f"bench: {case}: no data-track frame arrived in 15 s")
        await asyncio.sleep(0.2)
        first = seq
        collect.reset(1 << 62, first)
        collect.out_of_order = 0
        cpu_start = time.process_time()
        start = time.perf_counter()
        interval = 1.0 / rate
        while (now := time.perf_counter()) - start < duration:
            due = int((now - start) / interval) + 1
            while seq - first < due:
                if push(_payload(seq, size)):
                    result.pushed += 1
                else:
                    result.refused += 1
                seq += 1
            await asyncio.sleep(interval / 2)
        window = time.perf_counter() - start
        await asyncio.sleep(0.5)  # the last frames' way through
        cpu = time.process_time() - cpu_start
        result.received = collect.seen
        result.lost_pct = 100.0 * (1 - collect.seen / max(result.pushed, 1))
        result.rate = collect.seen / window
        result.p50_ms = _pct(collect.latencies, 0.50)
        result.p99_ms = _pct(collect.latencies, 0.99)
        result.out_of_order = collect.out_of_order
        result.cpu_us_per_frame = cpu / max(collect.seen, 1) * 1e6
    return result


# ----------------------------------------------------------------------------- byte streams


@dataclass
class StreamResult:
    case: str
    size: int = 0
    received: int = 0
    intact: bool = False
    seconds: float = 0.0
    mb_per_s: float = 0.0


async def bench_stream(
    server: LiveKitServer, case: str, path: Path, digest: str, limit: float
) -> StreamResult:
    size = (await asyncio.to_thread(path.stat)).st_size
    result = StreamResult(case, size=size)
    async with pair(server, case) as (sender, receiver, _ours):
        finished: asyncio.Future[tuple[int, str, float]] = (
            asyncio.get_running_loop().create_future()
        )

        async def read(reader: AsyncIterator[bytes]) -> None:
            sha = hashlib.sha256()
            n = 0
            async for chunk in reader:
                sha.update(chunk)
                n += len(chunk)
            if not finished.done():
                finished.set_result((n, sha.hexdigest(), time.perf_counter()))

        receiver.on_file(read)
        start = time.perf_counter()
        send = asyncio.create_task(sender.send_file(str(path)), name="bench-send-file")
        try:
            n, got, end = await asyncio.wait_for(asyncio.shield(finished), limit)
            await send
        finally:
            if not send.done():
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await send
        result.received = n
        result.intact = got == digest
        result.seconds = end - start
        result.mb_per_s = size / result.seconds / 1e6
    return result


# ----------------------------------------------------------------------------- report


def _ratio(value: float, base: float) -> str:
    return f"{value / base:5.2f}x" if base else "   - "


def report(
    messages: list[MessageResult],
    streams: list[StreamResult],
    tracks: list[TrackResult] | None = None,
) -> str:
    lines = []
    base = next((m for m in messages if m.case == "sdk->sdk"), None)
    if messages:
        lines.append(
            f"{'256 B msgs':<16} {'msg/s':>9} {'ratio':>6} {'sent/s':>9} "
            f"{'loaded p50/p99 ms':>19} {'paced p50/p99 ms':>17} {'max gap ms':>10} "
            f"{'cpu us/msg':>10} {'lost':>5} {'ooo':>4}"
        )
        for m in messages:
            lines.append(
                f"{m.case:<16} {m.rate:9.0f} {_ratio(m.rate, base.rate if base else 0):>6} "
                f"{m.send_rate:9.0f} {m.loaded_p50_ms:9.1f}/{m.loaded_p99_ms:<9.1f} "
                f"{m.paced_p50_ms:8.2f}/{m.paced_p99_ms:<8.2f} {m.max_gap_ms:10.0f} "
                f"{m.cpu_us_per_msg:10.0f} "
                f"{m.lost:5d} {m.out_of_order:4d}"
            )
    sbase = next((s for s in streams if s.case == "sdk->sdk"), None)
    if streams:
        lines.append("")
        lines.append(f"{'byte stream':<16} {'MB/s':>7} {'ratio':>6} {'seconds':>8} {'intact':>7}")
        for s in streams:
            lines.append(
                f"{s.case:<16} {s.mb_per_s:7.2f} "
                f"{_ratio(s.mb_per_s, sbase.mb_per_s if sbase else 0):>6} "
                f"{s.seconds:8.2f} {s.intact!s:>7}"
            )
    tbase = next((t for t in tracks or [] if t.case == "sdk->sdk"), None)
    if tracks:
        lines.append("")
        lines.append(
            f"{'data track':<16} {'frames/s':>9} {'ratio':>6} {'offered':>8} {'lost %':>7} "
            f"{'refused':>7} {'p50/p99 ms':>15} {'cpu us/frame':>12} {'ooo':>4}"
        )
        for t in tracks:
            lines.append(
                f"{t.case:<16} {t.rate:9.0f} {_ratio(t.rate, tbase.rate if tbase else 0):>6} "
                f"{t.offered:8.0f} {t.lost_pct:7.2f} {t.refused:7d} "
                f"{t.p50_ms:7.2f}/{t.p99_ms:<7.2f} {t.cpu_us_per_frame:12.0f} {t.out_of_order:4d}"
            )
    return "\n".join(lines)


def _variants(cases: list[str], compare_stock: bool) -> list[tuple[str, bool]]:
    """The cases to run, each of ours also with aiortc's stock SCTP when comparing."""
    out = []
    for case in cases:
        out.append((case, False))
        if compare_stock and "ours" in case:
            out.append((case, True))
    return out


@contextlib.contextmanager
def _stock_sctp(stock: bool) -> Iterator[None]:
    """Run with aiortc's stock SCTP (our fixes from bridge.room.sctp removed) when `stock`."""
    if not stock:
        sctp.install()
        yield
        return
    sctp.uninstall()
    try:
        yield
    finally:
        sctp.install()


async def run(args: argparse.Namespace) -> int:
    if not os.environ.get("ROOMBUS_NETNS"):
        print("bench: run inside the test namespace: scripts/netns .venv/bin/python -m bench...")
        return 2
    cases = [c for c in CASES if c in args.cases]
    with tempfile.TemporaryDirectory(prefix="room-bench-") as tmp:
        workdir = Path(tmp)
        server = LiveKitServer(
            name="livekit-bench",
            workdir=workdir / "livekit",
            port=args.port,
            udp_port=args.port + 2,
            turn_port=args.turn_port,
        )
        await asyncio.to_thread(server.start)
        messages: list[MessageResult] = []
        streams: list[StreamResult] = []
        tracks: list[TrackResult] = []
        try:
            if not args.no_messages:
                for case, stock in _variants(cases, args.compare_stock):
                    with _stock_sctp(stock):
                        result = await bench_messages(
                            server, case, args.duration, args.drain_timeout, args.sdk_window
                        )
                    result.case += " stock" if stock else ""
                    messages.append(result)
                    print(report([messages[-1]], []), flush=True)
            if args.file_mb > 0:
                path = workdir / "payload.bin"
                data = os.urandom(int(args.file_mb * 1_000_000))
                path.write_bytes(data)
                digest = hashlib.sha256(data).hexdigest()
                del data
                for case, stock in _variants(cases, args.compare_stock):
                    with _stock_sctp(stock):
                        sresult = await bench_stream(
                            server, case, path, digest, args.stream_timeout
                        )
                    sresult.case += " stock" if stock else ""
                    streams.append(sresult)
                    print(report([], [streams[-1]]), flush=True)
            if args.track_rate > 0:
                for case in cases:
                    tresult = await bench_data_track(
                        server, case, args.track_rate, args.duration, args.track_size
                    )
                    tracks.append(tresult)
                    print(report([], [], [tracks[-1]]), flush=True)
        finally:
            await asyncio.to_thread(server.stop)
    print()
    print(report(messages, streams, tracks))
    if args.json:
        out = {
            "python": sys.version.split()[0],
            "duration": args.duration,
            "file_mb": args.file_mb,
            "sdk_window": args.sdk_window,
            "sctp_patched": sctp.is_installed(),
            "messages": [asdict(m) for m in messages],
            "streams": [asdict(s) for s in streams],
            "data_tracks": [asdict(t) for t in tracks],
            "track_rate": args.track_rate,
            "track_size": args.track_size,
        }
        base = next((m for m in messages if m.case == "sdk->sdk"), None)
        sbase = next((s for s in streams if s.case == "sdk->sdk"), None)
        for m in out["messages"]:
            m["ratio"] = m["rate"] / base.rate if base and base.rate else None
        for s in out["streams"]:
            s["ratio"] = s["mb_per_s"] / sbase.mb_per_s if sbase and sbase.mb_per_s else None
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(out, indent=2))
    bad: list[MessageResult | StreamResult | TrackResult] = [
        m for m in messages if m.lost or m.out_of_order
    ]
    bad += [s for s in streams if not s.intact]
    bad += [t for t in tracks if t.out_of_order or not t.received]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", help="write results as JSON to this path")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per message case")
    parser.add_argument("--file-mb", type=float, default=20.0, help="byte stream size (0: skip)")
    parser.add_argument("--no-messages", action="store_true", help="skip the message cases")
    parser.add_argument(
        "--track-rate", type=float, default=200.0, help="data-track frames/s (0: skip)"
    )
    parser.add_argument("--track-size", type=int, default=256, help="data-track frame bytes")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument(
        "--sdk-window", type=int, default=4, help="SDK publish_data calls kept in flight"
    )
    parser.add_argument(
        "--compare-stock",
        action="store_true",
        help="run our cases also with aiortc's stock SCTP (without bridge.room.sctp)",
    )
    parser.add_argument("--port", type=int, default=8080, help="server port (UDP: port + 2)")
    parser.add_argument("--turn-port", type=int, default=3678)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--stream-timeout", type=float, default=300.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
