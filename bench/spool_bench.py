"""The spool's cost per message: append + remove, one by one and in group commits.

For 256-byte payloads it measures, per case (group size 1, 10, 100):

* **cpu us/msg**: process CPU time (``time.process_time``) per message for appending it and,
  once "acknowledged", removing it, in steady state with a window of messages in flight (the
  spool holds ``--window`` messages throughout, as while a publisher waits for acks);
* **append / remove**: the same split into its two halves;
* **p99 / max ms**: wall time of one call (append_many or remove of one group); the maximum
  is the commit that carries SQLite's automatic checkpoint (every 1000 WAL pages, ~4 MB: its
  fsyncs), or preemption by other load on the machine;
* **checkpoints**: with automatic checkpoints off, a PASSIVE checkpoint run by hand each time
  the WAL reaches 256 or 1000 pages (the spool's setting, SQLite's default), timed in wall and
  CPU time: the stall the commit that crosses the threshold carries, and how much is fsync;
* **file MB**: the spool file plus its WAL after appending ``--messages`` without removing any
  (an outage backlog), against the payload bytes it holds; **reopen ms**: opening that file
  again (the SUM that restores the totals).

It also times `encode_outbound` / `decode_outbound` for a typical rendered message. No servers
needed; run it directly::

    .venv/bin/python -m bench.spool_bench [--messages 20000] [--dir /path/on/the/real/disk]

Figures vary with the disk and the machine's load; compare the cases within one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bridge.envelope import Outbound
from bridge.spool import SPOOL_FILE, Spool, decode_outbound, encode_outbound

PAYLOAD = 256


@dataclass
class Result:
    group: int
    append_us: float
    remove_us: float
    p99_ms: float
    max_ms: float
    file_mb: float
    payload_mb: float
    reopen_ms: float

    @property
    def total_us(self) -> float:
        return self.append_us + self.remove_us


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def _file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        p = Path(str(path) + suffix)
        if p.exists():
            total += p.stat().st_size
    return total


def run_case(directory: Path, group: int, messages: int, window: int) -> Result:
    path = directory / f"g{group}" / SPOOL_FILE
    payload = os.urandom(PAYLOAD)
    spool = Spool.open(path, max_bytes=1 << 40, max_age=None)
    route = spool.route("room:lobby->kafka:events")
    keys = [f"k{i}" for i in range(16)]
    batches = [[(keys[(i + j) % 16], payload) for j in range(group)] for i in range(16)]

    # Fill the window first: the messages in flight while the publisher waits for acks.
    inflight: list[int] = []
    while len(inflight) < window:
        inflight += [s for s in route.append_many(batches[0]) if s is not None]

    append_cpu = remove_cpu = 0.0
    walls: list[float] = []
    head = 0
    for n in range(messages // group):
        w0, c0 = time.perf_counter(), time.process_time()
        seqs = route.append_many(batches[n % 16])
        c1 = time.process_time()
        walls.append(time.perf_counter() - w0)
        inflight += [s for s in seqs if s is not None]
        acked = inflight[head : head + group]
        head += group
        w1 = time.perf_counter()
        route.remove(acked)
        c2 = time.process_time()
        walls.append(time.perf_counter() - w1)
        append_cpu += c1 - c0
        remove_cpu += c2 - c1
    route.remove(inflight[head:])
    assert route.count == 0, route.count

    # The backlog of an outage: nothing removed.
    for n in range(messages // group):
        route.append_many(batches[n % 16])
    file_bytes = _file_bytes(path)
    payload_bytes = route.bytes
    spool.close()
    t0 = time.perf_counter()
    spool = Spool.open(path, max_bytes=1 << 40, max_age=None)
    reopen = time.perf_counter() - t0
    spool.close()

    done = (messages // group) * group
    return Result(
        group=group,
        append_us=append_cpu / done * 1e6,
        remove_us=remove_cpu / done * 1e6,
        p99_ms=_p99(walls) * 1e3,
        max_ms=max(walls) * 1e3,
        file_mb=file_bytes / 1e6,
        payload_mb=payload_bytes / 1e6,
        reopen_ms=reopen * 1e3,
    )


def checkpoint_cost(directory: Path, pages: int, messages: int) -> tuple[int, float, float, float]:
    """Checkpoints every `pages` WAL pages, run here: (count, median, max, median CPU) in ms."""
    path = directory / f"ckpt{pages}" / SPOOL_FILE
    spool = Spool.open(path, max_bytes=1 << 40, max_age=None)
    # The bench reaches in: automatic checkpoints off, and the checkpoints SQLite would run
    # inside a commit are run here by hand, and timed.
    db = spool._db
    db.execute("PRAGMA wal_autocheckpoint=0")
    route = spool.route("r")
    payload = os.urandom(PAYLOAD)
    inflight: list[int] = []
    times: list[float] = []
    cpu: list[float] = []
    wal_pages = 0
    for _ in range(messages // 10):
        inflight += [s for s in route.append_many([("k", payload)] * 10) if s is not None]
        if len(inflight) > 1000:
            route.remove(inflight[:10])
            del inflight[:10]
        wal_pages = (Path(str(path) + "-wal").stat().st_size - 32) // (4096 + 24)
        if wal_pages >= pages:
            t0, c0 = time.perf_counter(), time.process_time()
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next count starts from zero
    spool.close()
    times.sort()
    cpu.sort()
    n = len(times)
    return n, times[n // 2] * 1e3, times[-1] * 1e3, cpu[n // 2] * 1e3


def codec_cost(n: int = 20_000) -> tuple[float, float, int]:
    msg = Outbound(
        topic="rooms/lobby/events",
        payload=os.urandom(PAYLOAD),
        key=b"sensor-17",
        headers=(
            ("lk-room", "lobby"),
            ("lk-room-sid", "RM_abcdef123456"),
            ("lk-participant", "sensor-17"),
            ("lk-participant-sid", "PA_abcdef123456"),
            ("lk-topic", "telemetry"),
            ("lk-kind", "packet-reliable"),
            ("lk-timestamp", "1767225600000"),
            ("roombus-source", "room:lobby"),
        ),
        content_type="application/json",
    )
    now = time.time()
    c0 = time.process_time()
    for _ in range(n):
        blob = encode_outbound(msg, now)
    c1 = time.process_time()
    for _ in range(n):
        decode_outbound(blob)
    c2 = time.process_time()
    return (c1 - c0) / n * 1e6, (c2 - c1) / n * 1e6, len(blob)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000, help="messages per case")
    ap.add_argument("--window", type=int, default=1_000, help="messages in flight")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the spool files")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="spool-bench-") as tmp:
        results = [run_case(Path(tmp), g, args.messages, args.window) for g in (1, 10, 100)]
        checkpoints = [(p, *checkpoint_cost(Path(tmp), p, args.messages)) for p in (256, 1000)]
    enc, dec, size = codec_cost()

    print(
        f"spool: {PAYLOAD}-byte payloads, {args.messages} messages per case, "
        f"{args.window} in flight\n"
    )
    print(
        "| group commit | cpu us/msg (append+remove) | append | remove | call p99 ms | "
        "call max ms | file MB (payload MB) | reopen ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.group} | {r.total_us:.1f} | {r.append_us:.1f} | {r.remove_us:.1f} | "
            f"{r.p99_ms:.2f} | {r.max_ms:.1f} | {r.file_mb:.1f} ({r.payload_mb:.1f}) | "
            f"{r.reopen_ms:.1f} |"
        )
    print("\n| WAL pages per checkpoint | checkpoints | wall median ms | wall max ms | cpu ms |")
    print("|---:|---:|---:|---:|---:|")
    for pages, n, median, worst, cpu in checkpoints:
        print(f"| {pages} | {n} | {median:.1f} | {worst:.1f} | {cpu:.2f} |")
    print(
        f"\ncodec: encode_outbound {enc:.1f} us, decode_outbound {dec:.1f} us per message "
        f"({size} bytes for a {PAYLOAD}-byte payload with 8 provenance headers)"
    )


if __name__ == "__main__":
    main()
