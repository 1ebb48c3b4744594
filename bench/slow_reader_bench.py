"""What livekit-server's `rtc.datachannel_slow_threshold` does to a slow bridge participant.

For each threshold (one livekit-server each, the setting merged over tests/services/livekit.yaml)
and each stall pattern, an official-SDK sender publishes reliable packets at a steady rate into
a fresh room with two receivers:

- **slow**: our participant (`bridge.room.Room`) in a separate process that is stopped and
  continued (SIGSTOP/SIGCONT) on a fixed cycle, which is what a CPU-starved bridge looks like
  to the server;
- **fast**: an official-SDK receiver in this process (same clock as the sender, so the payload
  timestamp gives its one-way latency).

It counts the sequence numbers each receiver got against those sent, greps the server log for
its "drop data message by slow reader" lines (logged once per 100 drops, with a running count)
and reports the sender's publish_data latency and the fast receiver's latency and loss.

Run inside the namespace::

    scripts/netns .venv/bin/python -m bench.slow_reader_bench [--thresholds 0 1 10000] \
        [--patterns none 300/1000 1000/2000 1800/2000 3000/4000] \
        [--count 2000] [--rate 250] [--json out.json]

A pattern "S/P" stops the slow participant for S ms out of every P ms. Every loop is bounded
in count and time. The machine is shared: compare rows within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from livekit import rtc

from bench.room_bench import token
from bridge.room.events import DataReceived
from bridge.room.room import Room
from tests.services import LiveKitServer

log = logging.getLogger("bench.slow_reader")

TOPIC = "slow-bench"
# Every payload starts with the send time (time.monotonic, the same clock in every process on
# Linux) and the sequence number; the rest is padding.
_HEAD = struct.Struct("!dI")
SMALL = 1024
DROP_LINE = "drop data message by slow reader"
SEND_ERROR_LINE = "send data message error"
PATTERNS = ("none", "300/1000", "1000/2000", "1800/2000", "3000/4000")
_COUNT = re.compile(r'"count":\s*(\d+)|count[=:\s]+(\d+)')


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ----------------------------------------------------------------------------- slow child


async def child(url: str, jwt: str, limit: float) -> int:
    """The slow participant: our Room, recording what arrives; prints progress lines and, on
    SIGTERM (or after `limit` seconds), one JSON line with the sequence numbers and latencies."""
    room = Room()
    seqs: list[int] = []
    lat_ms: list[float] = []

    def on_data(event: DataReceived) -> None:
        data = event.packet.data
        if event.packet.topic != TOPIC or len(data) < _HEAD.size:
            return
        sent, seq = _HEAD.unpack_from(data)
        seqs.append(seq)
        lat_ms.append((time.monotonic() - sent) * 1000)

    room.on(DataReceived, on_data)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await room.connect(url, jwt)
    print("ready", flush=True)
    deadline = time.monotonic() + limit
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            print(f"n {len(seqs)}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        print("result " + json.dumps({"seqs": seqs, "lat_ms": lat_ms}), flush=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(room.disconnect(), 5)
    return 0


class SlowChild:
    """The child process as the parent sees it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.count = 0
        self.result: dict[str, list[float]] | None = None
        self.ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="slow-child-stdout")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        for _ in range(1_000_000):  # bounded: ~4 progress lines a second
            line = await self.proc.stdout.readline()
            if not line:
                return
            text = line.decode(errors="replace").strip()
            if text == "ready":
                self.ready.set()
            elif text.startswith("n "):
                self.count = int(text[2:])
            elif text.startswith("result "):
                self.result = json.loads(text[7:])

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    async def finish(self) -> dict[str, list[float]]:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 5)
        return self.result or {"seqs": [], "lat_ms": []}


# ----------------------------------------------------------------------------- one case


@dataclass
class CaseResult:
    threshold: int
    pattern: str
    sent: int = 0
    sent_bytes: int = 0
    send_s: float = 0.0  # first to last publish_data call; the plan is count / rate
    publish_p50_ms: float = 0.0  # publish_data call to its resolution
    publish_max_ms: float = 0.0
    slow_received: int = 0
    slow_lost: int = 0
    slow_large_lost: int = 0
    slow_p50_ms: float = 0.0
    slow_max_ms: float = 0.0
    fast_received: int = 0
    fast_lost: int = 0
    fast_p50_ms: float = 0.0
    fast_p99_ms: float = 0.0
    fast_max_ms: float = 0.0
    drop_lines: int = 0
    drop_count: int = 0  # the highest running count in those lines (≈ packets dropped)
    error_lines: int = 0
    samples: list[str] = field(default_factory=list)


def _parse_pattern(pattern: str) -> tuple[float, float]:
    if pattern == "none":
        return 0.0, 1.0
    stopped, period = (int(part) for part in pattern.split("/"))
    if not 0 <= stopped < period:
        raise ValueError(f"pattern {pattern!r}: want STOPPED/PERIOD ms with STOPPED < PERIOD")
    return stopped / 1000, period / 1000


async def _staller(slow: SlowChild, stopped: float, period: float, until: asyncio.Event) -> int:
    """Stop the child `stopped` s of every `period` s until `until` is set; returns cycles."""
    cycles = 0
    if stopped <= 0:
        return 0
    try:
        for _ in range(10_000):  # bounded; the caller sets `until` after the send
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), period - stopped)
            if until.is_set():
                break
            slow.signal(signal.SIGSTOP)
            cycles += 1
            await asyncio.sleep(stopped)
            slow.signal(signal.SIGCONT)
    finally:
        slow.signal(signal.SIGCONT)
    return cycles


def _payload(seq: int, size: int) -> bytes:
    head = _HEAD.pack(time.monotonic(), seq)
    return head + bytes(size - len(head))


def _grep(text: str, result: CaseResult, room_name: str) -> None:
    for line in text.splitlines():
        if room_name not in line:
            continue
        if DROP_LINE in line:
            result.drop_lines += 1
            found = _COUNT.search(line.split(DROP_LINE, 1)[1])
            if found:
                result.drop_count = max(result.drop_count, int(found.group(1) or found.group(2)))
            if len(result.samples) < 3:
                result.samples.append(line.strip()[:400])
        elif SEND_ERROR_LINE in line:
            result.error_lines += 1
            if len(result.samples) < 3:
                result.samples.append(line.strip()[:400])


async def _wait_visible(rooms: list[rtc.Room], want: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all(len(room.remote_participants) >= want for room in rooms):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"bench: participants did not see each other within {limit:.0f} s")


async def run_case(
    server: LiveKitServer, threshold: int, pattern: str, args: argparse.Namespace
) -> CaseResult:
    result = CaseResult(threshold=threshold, pattern=pattern)
    stopped, period = _parse_pattern(pattern)
    room_name = f"slow-{threshold}-{pattern.replace('/', '-')}-{uuid.uuid4().hex[:6]}"
    log_before = len(server.log_since_start())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.slow_reader_bench",
        "--child",
        server.url,
        token(server, room_name, "slow-ours"),
        str(args.count / args.rate + args.drain + 60),
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    slow = SlowChild(proc)
    sender = rtc.Room()
    fast = rtc.Room()
    fast_lat: dict[int, float] = {}
    try:
        await asyncio.wait_for(slow.ready.wait(), 30)
        await sender.connect(server.url, token(server, room_name, "sdk-tx"))
        await fast.connect(server.url, token(server, room_name, "sdk-fast"))

        def on_fast(packet: rtc.DataPacket) -> None:
            if packet.topic == TOPIC and len(packet.data) >= _HEAD.size:
                sent, seq = _HEAD.unpack_from(packet.data)
                fast_lat[seq] = (time.monotonic() - sent) * 1000

        fast.on("data_received", on_fast)
        await _wait_visible([sender, fast], 2, 15)
        for _ in range(20):  # warm-up, not counted: the first packets set up the paths
            await sender.local_participant.publish_data(bytes(SMALL), topic="warm-up")
        await asyncio.sleep(1)

        until = asyncio.Event()
        stall = asyncio.create_task(_staller(slow, stopped, period, until), name="staller")
        pending: set[asyncio.Task[None]] = set()
        publish_ms: list[float] = []

        async def publish(payload: bytes) -> None:
            start = time.monotonic()
            await sender.local_participant.publish_data(payload, reliable=True, topic=TOPIC)
            publish_ms.append((time.monotonic() - start) * 1000)

        large: set[int] = set()
        start = time.monotonic()
        for seq in range(args.count):
            due = start + seq / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(pending) >= args.window:
                done, pending = await asyncio.wait(
                    pending, timeout=30, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    raise RuntimeError("bench: publish_data did not resolve within 30 s")
                for task in done:
                    task.result()
            big = args.large_every and seq % args.large_every == 0
            size = args.large_kb * 1024 if big else SMALL
            if big:
                large.add(seq)
            result.sent_bytes += size
            pending.add(asyncio.create_task(publish(_payload(seq, size))))
        result.send_s = time.monotonic() - start
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), 60)
        result.sent = args.count
        until.set()
        await stall

        # Drain: until both receivers have everything, or neither made progress for 3 s.
        deadline = time.monotonic() + args.drain
        last, last_change = (-1, -1), time.monotonic()
        while time.monotonic() < deadline:
            now = (slow.count, len(fast_lat))
            if now == (args.count, args.count):
                break
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > 3:
                break
            await asyncio.sleep(0.1)
        got = await slow.finish()
        seqs = {int(s) for s in got["seqs"]}
        result.slow_received = len(seqs)
        result.slow_lost = args.count - len(seqs & set(range(args.count)))
        result.slow_large_lost = len(large - seqs)
        result.slow_p50_ms = _pct(got["lat_ms"], 0.5)
        result.slow_max_ms = max(got["lat_ms"], default=float("nan"))
        lat = list(fast_lat.values())
        result.fast_received = len(fast_lat)
        result.fast_lost = args.count - len(fast_lat)
        result.fast_p50_ms = _pct(lat, 0.5)
        result.fast_p99_ms = _pct(lat, 0.99)
        result.fast_max_ms = max(lat, default=float("nan"))
        result.publish_p50_ms = _pct(publish_ms, 0.5)
        result.publish_max_ms = max(publish_ms, default=float("nan"))
    finally:
        slow.signal(signal.SIGCONT)
        if proc.returncode is None:
            await slow.finish()
        for room in (fast, sender):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(room.disconnect(), 10)
    await asyncio.sleep(1)  # let the server log what it dropped
    _grep(server.log_since_start()[log_before:], result, room_name)
    return result


# ----------------------------------------------------------------------------- report


def report(results: list[CaseResult], args: argparse.Namespace) -> str:
    head = (
        "| threshold | stall | sent | slow got | slow lost (large) | slow p50/max ms "
        "| drop lines (count) | fast p50/p99/max ms | fast lost | publish p50/max ms | send s |"
    )
    rows = [head, "|" + "---|" * 11]
    for r in results:
        rows.append(
            f"| {r.threshold} | {r.pattern} | {r.sent} | {r.slow_received} "
            f"| {r.slow_lost} ({r.slow_large_lost}) | {r.slow_p50_ms:.0f}/{r.slow_max_ms:.0f} "
            f"| {r.drop_lines} ({r.drop_count}) "
            f"| {r.fast_p50_ms:.1f}/{r.fast_p99_ms:.0f}/{r.fast_max_ms:.0f} | {r.fast_lost} "
            f"| {r.publish_p50_ms:.1f}/{r.publish_max_ms:.0f} | {r.send_s:.1f} |"
        )
    plan = args.count / args.rate
    rows.append(
        f"\n{args.count} reliable packets at {args.rate:g}/s (planned send {plan:.1f} s), "
        f"every {args.large_every}th {args.large_kb} KB, the rest {SMALL // 1024} KB; "
        f"stall S/P = slow participant stopped S ms of every P ms."
    )
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> int:
    if not os.environ.get("ROOMBUS_NETNS"):
        print("bench: run inside the test namespace: scripts/netns .venv/bin/python -m bench...")
        return 2
    for pattern in args.patterns:
        _parse_pattern(pattern)
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="slow-reader-bench-") as tmp:
        for threshold in args.thresholds:
            server = LiveKitServer(
                name=f"livekit-slow-{threshold}",
                workdir=Path(tmp) / f"livekit-{threshold}",
                port=args.port,
                udp_port=args.port + 2,
                turn_port=args.port + 4,
                overrides={"rtc": {"datachannel_slow_threshold": threshold}},
            )
            await asyncio.to_thread(server.start)
            try:
                for pattern in args.patterns:
                    result = await asyncio.wait_for(
                        run_case(server, threshold, pattern, args),
                        args.count / args.rate + args.drain + 180,
                    )
                    results.append(result)
                    print(report([result], args).splitlines()[2], flush=True)
                    for sample in result.samples:
                        print("   server:", sample, flush=True)
            finally:
                await asyncio.to_thread(server.stop)
    print()
    print(report(results, args))
    if args.json:
        out = {"args": vars(args), "results": [asdict(r) for r in results]}
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--child", nargs=3, metavar=("URL", "TOKEN", "LIMIT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--thresholds", type=int, nargs="+", default=[0, 1, 1000, 10000, 100000])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--count", type=int, default=2000, help="packets per case")
    parser.add_argument("--rate", type=float, default=250.0, help="packets per second")
    parser.add_argument("--large-every", type=int, default=200, help="every Nth packet large")
    parser.add_argument("--large-kb", type=int, default=15, help="size of those, KiB")
    parser.add_argument("--window", type=int, default=4, help="publish_data calls in flight")
    parser.add_argument("--drain", type=float, default=20.0, help="max s to wait after sending")
    parser.add_argument("--port", type=int, default=7940, help="HTTP port; UDP +2, TURN +4")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        url, jwt, limit = args.child
        return asyncio.run(child(url, jwt, float(limit)))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
