"""The durable buffer of room→bus routes: a message stays on disk until the broker has it.

LiveKit cannot redeliver, so for a room→bus route the bridge owns each message from the moment
it receives it. A route with a spool appends the message here *before* it counts as received,
publishes from here, and removes it only once the broker acknowledged it; after a bus outage or
a restart (also after SIGKILL) it replays what is left, in order.

Storage: one SQLite file per bridge state directory (``<state_dir>/spool.sqlite3``), from the
standard library, in WAL mode with ``synchronous=NORMAL``. A commit is then a write into the WAL
without an fsync: it survives a crash or SIGKILL of the process (the data is in the OS page
cache), but a power loss or kernel crash may lose the last commits (SQLite keeps the file
consistent).
An exclusive ``flock`` on ``<file>.lock``, held until close (and released by the kernel when
the process dies), makes a second bridge on the same state directory fail to open it
(`SpoolError`) instead of replaying the same messages twice.

Layout: one table per route (``items_<id>``, ``seq INTEGER PRIMARY KEY AUTOINCREMENT``), named
in a ``routes`` table. A per-route table needs no secondary index: appends go to the end of one
b-tree, ``pending`` is a range scan of it, ``remove`` seeks by rowid. AUTOINCREMENT makes ``seq``
strictly increasing for the life of the file, also across restarts and after the table emptied,
so a publisher's cursor (``after_seq``) never meets a reused number.

Limits:

* ``max_bytes`` is the whole spool's budget, split evenly between the routes opened in this run
  (each gets ``max_bytes // n``; it is re-split when a route opens, so open every route before
  appending). A route whose bus is down therefore cannot starve the routes whose bus is up. What
  counts is the payload length (the encoded message); the file is larger (SQLite pages, the WAL:
  see ``bench/README.md``). A route over its share after a restart with more routes keeps what it
  has; only new appends are judged.
* When an append does not fit, the route's overflow policy decides, counted in
  ``spool.dropped_overflow``: ``drop_newest`` drops the new message, ``drop_oldest`` deletes the
  route's oldest messages until it fits (a message larger than the whole share is dropped either
  way). Under ``drop_oldest`` an evicted message may already be on its way to the broker; its
  later `RouteSpool.remove` is then a no-op.
* ``max_age`` (seconds, or None): `expire` deletes older messages, counted in ``spool.expired``.
  Age is measured from the ``at`` given to append (default: now, wall clock). Expiry works from
  the oldest message forwards and stops at the first young one, so it costs O(expired).

Cost and the event loop: each call is one short synchronous SQLite transaction, run on the
event loop (``bench/spool_bench.py``: about 25-30 us of CPU for a one-message commit, 4-5 us per
message in groups of 100). ``append_many`` and `Spool.batch` put several messages in one commit
(group commit), which is what makes it cheap; the runtime should also batch its removes. A
commit in WAL mode with ``synchronous=NORMAL`` does not fsync. The exception is the commit
that takes the WAL past ``wal_autocheckpoint`` pages (SQLite's default 1000, ~4 MB): SQLite
checkpoints the WAL into the database inside it, with an fsync of the WAL before and of the
database after. Measured here, that checkpoint costs 0.5-1 ms of CPU but 3-15 ms of wall time
typically and up to 30-80 ms when other processes load the disk: the loop waits for fsync,
once per ~4 MB of WAL (every few seconds at 200 msg/s). A background checkpoint thread does not
remove that wait: under continuous writes its checkpoint never catches up with the WAL's end,
so the WAL never starts over (measured: it grew to 60 MB in 20,000 one-message commits), and
with ``synchronous=NORMAL`` the writer that starts the WAL over (the loop) fsyncs its header.
Taking the fsyncs off the loop would need every write on a writer thread (an async API). The
stall is rare, so the spool keeps SQLite's default, which needs fewer fsyncs per megabyte than
a smaller WAL (measured under load: 5.6 ms per 1 MB checkpoint, 9-16 ms per 4 MB one); if the
fleet benchmark shows the stalls in its p99, a writer thread is the next step. Calls whose cost
grows with their input (``remove`` of many seqs, ``expire``) take a ``limit`` or are given
bounded batches by the runtime.

Totals: counts and byte totals are kept as running totals (O(1) per operation)
and restored with one ``SUM`` per route when the file is opened. Routes found in the file but not
opened in this run keep their messages (`Spool.stale_routes`, `Spool.discard_route`).

The codec `encode_outbound` / `decode_outbound` turns a rendered `Outbound` plus the time it
was received into the bytes stored here: a versioned little-endian ``struct`` layout, no pickle.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import accumulate, pairwise
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from bridge.envelope import Outbound
from bridge.errors import BridgeError
from bridge.statefiles import private_dir, private_file

Overflow = Literal["drop_newest", "drop_oldest"]
OVERFLOW_POLICIES: tuple[Overflow, ...] = ("drop_newest", "drop_oldest")

Blob = bytes  # `bytes` is also a property name below
Item = tuple[int, str, bytes]  # (seq, key, payload)
Message = tuple[str, bytes]  # (key, payload)

SPOOL_FILE = "spool.sqlite3"
SCHEMA_VERSION = 1  # PRAGMA user_version of the file

# SQLite checkpoints inside the commit that takes the WAL past this many pages (4 KiB each).
WAL_AUTOCHECKPOINT_PAGES = 1000

# Appends and evictions read the oldest rows in chunks of this many.
_SCAN_CHUNK = 512


class SpoolError(BridgeError):
    """The spool cannot be opened or written (in use by another process, disk full, corrupt)."""


# ----------------------------------------------------------------------------- the spool


class Spool:
    """The bridge's spool file: one `RouteSpool` per room→bus route that spools.

    Open it with `Spool.open`; it is a context manager that closes it.
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        lock_fd: int,
        path: Path,
        max_bytes: int,
        max_age: float | None,
    ) -> None:
        self._db = db
        self._lock_fd = lock_fd
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._routes: dict[str, RouteSpool] = {}
        # Routes in the file, by name: (table id, count, bytes), restored at open.
        self._known: dict[str, tuple[int, int, int]] = {}
        self._depth = 0  # nesting of open write transactions
        self._touched: dict[RouteSpool, tuple[int, ...]] = {}  # state before the transaction
        self._closed = False

    @classmethod
    def open(cls, path: Path, *, max_bytes: int, max_age: float | None) -> Spool:
        """Open (or create) the spool file at `path` and restore its totals.

        Args:
            path: The SQLite file, e.g. ``<state_dir>/spool.sqlite3``; its directory is created.
            max_bytes: Payload bytes at most, split evenly between the opened routes.
            max_age: Seconds a message may stay (see `expire`), or None for no limit.

        Raises:
            SpoolError: The file is locked by another process, unreadable, or of a newer schema.
            ValueError: A limit is not positive.
        """
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be positive, got {max_bytes}")
        if max_age is not None and max_age <= 0:
            raise ValueError(f"spool max_age must be positive or None, got {max_age}")
        private_dir(path.parent)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SpoolError(f"spool {path}: open failed: in use by another process") from None
        db: sqlite3.Connection | None = None
        try:
            private_file(path)
            db = sqlite3.connect(path, isolation_level=None, timeout=0, cached_statements=64)
            spool = cls(db, lock_fd, path, max_bytes, max_age)
            spool._setup()
        except BaseException as exc:
            if db is not None:
                db.close()
            os.close(lock_fd)  # releases the flock
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"spool {path}: open failed: {exc}") from exc
            raise
        return spool

    def _setup(self) -> None:
        db = self._db
        # Only this connection ever uses the file (the flock above): EXCLUSIVE locking keeps the
        # WAL index in this process's memory (no -shm file) and saves the lock calls of every
        # transaction.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"spool {self.path}: cannot use WAL mode (got {mode!r})")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        # When the WAL starts over after a big transaction, shrink it back to 8 MB.
        db.execute("PRAGMA journal_size_limit=8388608")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SpoolError(
                    f"spool {self.path}: schema version {version} is newer than this bridge's "
                    f"{SCHEMA_VERSION}"
                )
            db.execute(
                "CREATE TABLE IF NOT EXISTS routes (id INTEGER PRIMARY KEY, name TEXT NOT NULL "
                "UNIQUE)"
            )
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            for rid, name in db.execute("SELECT id, name FROM routes").fetchall():
                count, nbytes = db.execute(_sql(_TOTALS, rid)).fetchone()
                self._known[str(name)] = (int(rid), int(count), int(nbytes))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def route(self, name: str, overflow: str = "drop_newest") -> RouteSpool:
        """The spool of the route called `name` (created if new), with its overflow policy.

        Open every route before appending: each opened route gets ``max_bytes // n``.
        `overflow` is ``drop_newest`` or ``drop_oldest`` (a plain str: the config's value).

        Raises:
            ValueError: `name` was already opened, `overflow` is unknown, or inside a `batch`.
        """
        self._check_open()
        if self._depth:  # a rolled-back batch would take the new table with it
            raise ValueError("spool routes are opened outside a batch")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"spool overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        if name in self._routes:
            raise ValueError(f"spool route {name!r} is already open")
        known = self._known.get(name)
        if known is None:
            with self._txn(None) as db:
                cur = db.execute("INSERT INTO routes (name) VALUES (?)", (name,))
                rid = int(cur.lastrowid or 0)
                db.execute(_sql(_CREATE, rid))
            known = (rid, 0, 0)
            self._known[name] = known
        policy: Overflow = "drop_oldest" if overflow == "drop_oldest" else "drop_newest"
        rs = RouteSpool(self, known[0], name, policy, known[1], known[2])
        self._routes[name] = rs
        share = self.max_bytes // len(self._routes)
        for r in self._routes.values():
            r.max_bytes = share
        return rs

    @property
    def routes(self) -> dict[str, RouteSpool]:
        """The routes opened in this run, by name."""
        return dict(self._routes)

    def stale_routes(self) -> dict[str, int]:
        """Routes in the file that were not opened in this run, with their message counts.

        Their messages stay (a later run that opens the route replays them) until
        `discard_route`.
        """
        return {n: k[1] for n, k in self._known.items() if n not in self._routes and k[1] > 0}

    def discard_route(self, name: str) -> int:
        """Delete a route that is not open, with all its messages; returns how many there were.

        Raises:
            ValueError: The route is open in this run, or inside a `batch`.
        """
        self._check_open()
        if self._depth:  # a rolled-back batch would bring the table back
            raise ValueError("spool routes are discarded outside a batch")
        if name in self._routes:
            raise ValueError(f"spool route {name!r} is open; cannot discard it")
        known = self._known.get(name)
        if known is None:
            return 0
        with self._txn(None) as db:
            db.execute(_sql(_DROP, known[0]))
            db.execute("DELETE FROM routes WHERE id = ?", (known[0],))
        del self._known[name]
        return known[1]

    @property
    def count(self) -> int:
        """Messages in the spool, over all routes (also those not opened in this run)."""
        return sum(r.count for r in self._routes.values()) + sum(
            k[1] for n, k in self._known.items() if n not in self._routes
        )

    @property
    def bytes(self) -> int:
        """Payload bytes in the spool, over all routes (also those not opened in this run)."""
        return sum(r.bytes for r in self._routes.values()) + sum(
            k[2] for n, k in self._known.items() if n not in self._routes
        )

    def expire(self, limit: int = 10_000) -> int:
        """Expire old messages on every opened route (see `RouteSpool.expire`); returns how many."""
        return sum(r.expire(limit) for r in self._routes.values())

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run the appends and removes inside it, over any routes, as one commit.

        The runtime appends everything received in one event-loop turn in one batch. If the
        block raises, the whole batch is rolled back (totals and counters too).
        """
        with self._txn(None):
            yield

    def close(self) -> None:
        """Close the file (SQLite checkpoints the WAL into it); calling it twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._depth:
                self._db.rollback()
            self._db.close()
        finally:
            os.close(self._lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- transactions

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.path} is closed")

    @contextmanager
    def _txn(self, route: RouteSpool | None) -> Iterator[sqlite3.Connection]:
        """One write transaction, or a part of the enclosing one (`batch`).

        A route's totals and counters are remembered on its first change in the transaction
        and put back if it rolls back, so they always match what is committed.
        """
        self._check_open()
        if route is not None and route not in self._touched:
            self._touched[route] = route._state()
        if self._depth:
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            for r, state in self._touched.items():
                r._restore(state)
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"spool {self.path}: write failed: {exc}") from exc
            raise
        finally:
            self._depth = 0
            self._touched.clear()


# ----------------------------------------------------------------------------- one route


class RouteSpool:
    """The spooled messages of one route, oldest first.

    Obtained from `Spool.route`. Items are ``(seq, key, payload)``: `seq` is the order (strictly
    increasing, also across restarts), `key` the ordering key the publisher keeps order within.
    """

    def __init__(
        self, spool: Spool, rid: int, name: str, overflow: Overflow, count: int, nbytes: int
    ) -> None:
        self.spool = spool
        self.name = name
        self.overflow: Overflow = overflow
        self.max_bytes = spool.max_bytes  # set to the route's share by Spool.route
        self._count = count
        self._bytes = nbytes
        self._appended = 0
        self._removed = 0
        self._dropped = 0
        self._expired = 0
        # Each route's statements, prepared once (sqlite3 caches them by text).
        self._sql_insert = _sql(_INSERT, rid)
        self._sql_pending = _sql(_PENDING, rid)
        self._sql_oldest = _sql(_OLDEST, rid)
        self._sql_delete_upto = _sql(_DELETE_UPTO, rid)
        self._sql_remove = _sql(_REMOVE, rid)
        self._sql_remove_one = _sql(_REMOVE_ONE, rid)
        self._sql_first_at = _sql(_FIRST_AT, rid)

    # -- state

    @property
    def count(self) -> int:
        """Messages spooled on this route."""
        return self._count

    @property
    def bytes(self) -> int:
        """Payload bytes spooled on this route."""
        return self._bytes

    @property
    def oldest_age(self) -> float | None:
        """Seconds since the oldest message was appended (its ``at``), or None when empty."""
        if not self._count:
            return None
        row = self.spool._db.execute(self._sql_first_at).fetchone()
        return None if row is None else max(0.0, time.time() - float(row[0]))

    @property
    def counters(self) -> dict[str, int]:
        """Counts since open: ``spool.appended``, ``.removed``, ``.dropped_overflow``, ``.expired``.

        ``spool.dropped_overflow`` counts messages, new ones and evicted old ones alike.
        """
        return {
            "spool.appended": self._appended,
            "spool.removed": self._removed,
            "spool.dropped_overflow": self._dropped,
            "spool.expired": self._expired,
        }

    def _state(self) -> tuple[int, ...]:
        return (
            self._count,
            self._bytes,
            self._appended,
            self._removed,
            self._dropped,
            self._expired,
        )

    def _restore(self, state: tuple[int, ...]) -> None:
        (
            self._count,
            self._bytes,
            self._appended,
            self._removed,
            self._dropped,
            self._expired,
        ) = state

    # -- operations

    def append(self, key: str, payload: Blob, *, at: float | None = None) -> int | None:
        """Store one message; returns its seq, or None if the overflow policy dropped it.

        Once it returns, the message survives a crash of the process.

        Raises:
            SpoolError: The write failed (disk full, I/O error).
        """
        return self.append_many(((key, payload),), at=at)[0]

    def append_many(self, items: Iterable[Message], *, at: float | None = None) -> list[int | None]:
        """Store several messages in one commit; returns each one's seq or None (dropped).

        The outcome is the same as appending them one by one (under ``drop_oldest`` a message
        of this group may evict an earlier one of the same group), at the cost of one commit.

        Args:
            items: ``(key, payload)`` pairs, in order.
            at: The time they were received (seconds since the epoch); default now.
        """
        batch = list(items)
        out: list[int | None] = [None] * len(batch)
        if not batch:
            return out
        when = time.time() if at is None else at
        quota = self.max_bytes
        with self.spool._txn(self) as db:
            accepted: Iterable[int]
            if self.overflow == "drop_newest":
                total = self._bytes
                keep: list[int] = []
                for i, (_, payload) in enumerate(batch):
                    size = len(payload)
                    if total + size <= quota:
                        keep.append(i)
                        total += size
                    else:
                        self._dropped += 1
                accepted = keep
            else:
                accepted = self._make_room(db, batch, quota)
            insert = self._sql_insert
            added = 0
            for i in accepted:
                key, payload = batch[i]
                out[i] = db.execute(insert, (when, key, payload)).lastrowid
                added += len(payload)
                self._count += 1
                self._appended += 1
            self._bytes += added
        return out

    def _make_room(self, db: sqlite3.Connection, batch: list[Message], quota: int) -> deque[int]:
        """drop_oldest: evict the oldest stored messages (then earlier ones of `batch`).

        Returns the indexes of `batch` to insert. All reads happen before the one DELETE.
        """
        total = self._bytes
        kept: deque[int] = deque()
        stored = self._scan_oldest(db)
        evict_upto = 0
        evicted = evicted_bytes = 0
        for i, (_, payload) in enumerate(batch):
            size = len(payload)
            if size > quota:
                self._dropped += 1
                continue
            while total + size > quota:
                row = next(stored, None)
                if row is not None:
                    evict_upto = row[0]
                    evicted += 1
                    evicted_bytes += row[2]
                    total -= row[2]
                elif kept:
                    total -= len(batch[kept.popleft()][1])
                    self._dropped += 1
                else:  # nothing left to evict: the totals say so too
                    break
            kept.append(i)
            total += size
        if evicted:
            db.execute(self._sql_delete_upto, (evict_upto,))
            self._count -= evicted
            self._bytes -= evicted_bytes
            self._dropped += evicted
        return kept

    def _scan_oldest(self, db: sqlite3.Connection) -> Iterator[tuple[int, float, int]]:
        """(seq, at, size) of the stored messages, oldest first, read in chunks."""
        after = 0
        while True:
            rows = db.execute(self._sql_oldest, (after, _SCAN_CHUNK)).fetchall()
            yield from rows
            if len(rows) < _SCAN_CHUNK:
                return
            after = rows[-1][0]

    def pending(self, limit: int, after_seq: int = 0) -> list[Item]:
        """Up to `limit` messages with seq greater than `after_seq`, oldest first."""
        self.spool._check_open()
        rows: list[Item] = self.spool._db.execute(self._sql_pending, (after_seq, limit)).fetchall()
        return rows

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete these messages (the broker acknowledged them); returns how many were there.

        Any order, any subset; seqs already gone (evicted, expired, removed) are ignored.
        """
        seq_list = [int(s) for s in seqs]
        if not seq_list:
            return 0
        with self.spool._txn(self) as db:
            if len(seq_list) == 1:  # the common one-ack case: a plain rowid seek
                sizes = db.execute(self._sql_remove_one, (seq_list[0],))
            else:
                sizes = db.execute(self._sql_remove, ("[" + ",".join(map(str, seq_list)) + "]",))
            gone = freed = 0
            for (size,) in sizes:
                gone += 1
                freed += size
            self._count -= gone
            self._bytes -= freed
            self._removed += gone
        return gone

    def expire(self, limit: int = 10_000) -> int:
        """Delete up to `limit` messages older than the spool's ``max_age``; returns how many.

        Works from the oldest forwards and stops at the first message that is young enough, so
        a message appended with an earlier ``at`` than its predecessor may outlive its age a
        little. Call it periodically; if it returns `limit`, call it again (after yielding).
        """
        max_age = self.spool.max_age
        if max_age is None or not self._count:
            return 0
        cutoff = time.time() - max_age
        db = self.spool._db
        first = db.execute(self._sql_first_at).fetchone()
        if first is None or first[0] >= cutoff:
            return 0
        with self.spool._txn(self) as db:
            rows = db.execute(self._sql_oldest, (0, limit)).fetchall()
            upto = n = freed = 0
            for seq, when, size in rows:
                if when >= cutoff:
                    break
                upto = seq
                n += 1
                freed += size
            if n:
                db.execute(self._sql_delete_upto, (upto,))
                self._count -= n
                self._bytes -= freed
                self._expired += n
        return n

    def __repr__(self) -> str:
        return f"RouteSpool({self.name!r}, count={self._count}, bytes={self._bytes})"


# Statements on one route's table; <table> is replaced by its name (never by user input: the name
# is built from the integer id), values are bound parameters.
_CREATE = (
    "CREATE TABLE <table> (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, "
    "key TEXT NOT NULL, payload BLOB NOT NULL)"
)
_TOTALS = "SELECT count(*), coalesce(sum(length(payload)), 0) FROM <table>"
_DROP = "DROP TABLE IF EXISTS <table>"
_INSERT = "INSERT INTO <table> (at, key, payload) VALUES (?, ?, ?)"
_PENDING = "SELECT seq, key, payload FROM <table> WHERE seq > ? ORDER BY seq LIMIT ?"
_OLDEST = "SELECT seq, at, length(payload) FROM <table> WHERE seq > ? ORDER BY seq LIMIT ?"
_DELETE_UPTO = "DELETE FROM <table> WHERE seq <= ?"
# json_each binds any number of seqs as one parameter: one prepared statement for every size.
_REMOVE = (
    "DELETE FROM <table> WHERE seq IN (SELECT value FROM json_each(?)) RETURNING length(payload)"
)
_REMOVE_ONE = "DELETE FROM <table> WHERE seq = ? RETURNING length(payload)"
_FIRST_AT = "SELECT at FROM <table> ORDER BY seq LIMIT 1"


def _sql(template: str, rid: int) -> str:
    return template.replace("<table>", f"items_{int(rid)}")


# ----------------------------------------------------------------------------- the codec

# Version 1, little-endian:
#   head:   version u8, flags u8, qos u8, n_fields u32, received_at f64, message_expiry i64
#   lengths: n_fields u32 each
#   fields: topic, [payload], [key], [content_type], [response_topic], [correlation_data],
#           then name, value of each header; strings UTF-8 (surrogatepass: any str round-trips)
_V1 = 1
_HEAD = struct.Struct("<BBBIdq")
_F_PAYLOAD = 0x01
_F_KEY = 0x02
_F_CONTENT_TYPE = 0x04
_F_RESPONSE_TOPIC = 0x08
_F_CORRELATION = 0x10
_F_EXPIRY = 0x20
_F_RETAIN = 0x40


def encode_outbound(o: Outbound, received_at: float) -> bytes:
    """The spool's bytes for a rendered message and the time it was received.

    Raises:
        ValueError: A number does not fit (qos outside 0..255, expiry outside int64).
    """
    flags = 0
    fields = [o.topic.encode("utf-8", "surrogatepass")]
    if o.payload is not None:
        flags |= _F_PAYLOAD
        fields.append(o.payload)
    if o.key is not None:
        flags |= _F_KEY
        fields.append(o.key)
    if o.content_type is not None:
        flags |= _F_CONTENT_TYPE
        fields.append(o.content_type.encode("utf-8", "surrogatepass"))
    if o.response_topic is not None:
        flags |= _F_RESPONSE_TOPIC
        fields.append(o.response_topic.encode("utf-8", "surrogatepass"))
    if o.correlation_data is not None:
        flags |= _F_CORRELATION
        fields.append(o.correlation_data)
    if o.message_expiry is not None:
        flags |= _F_EXPIRY
    if o.retain:
        flags |= _F_RETAIN
    for name, value in o.headers:
        fields.append(name.encode("utf-8", "surrogatepass"))
        fields.append(value.encode("utf-8", "surrogatepass"))
    n = len(fields)
    try:
        head = _HEAD.pack(_V1, flags, o.qos, n, received_at, o.message_expiry or 0)
        lengths = struct.pack(f"<{n}I", *map(len, fields))
    except struct.error as exc:
        raise ValueError(f"cannot encode message for {o.topic!r}: {exc}") from exc
    return b"".join((head, lengths, *fields))


def decode_outbound(b: bytes) -> tuple[Outbound, float]:
    """The message and its received-at time back from `encode_outbound`'s bytes.

    Raises:
        ValueError: Not a message of a known version, or truncated.
    """
    try:
        version, flags, qos, n, received_at, expiry = _HEAD.unpack_from(b)
        if version != _V1:
            raise ValueError(f"unknown spooled message version {version}")
        pos = _HEAD.size
        if pos + 4 * n > len(b):
            raise ValueError("truncated spooled message")
        lengths = struct.unpack_from(f"<{n}I", b, pos)
    except struct.error as exc:
        raise ValueError(f"truncated spooled message: {exc}") from exc
    pos += 4 * n
    if pos + sum(lengths) != len(b):
        raise ValueError("spooled message length does not match its fields")
    optional = flags & (_F_PAYLOAD | _F_KEY | _F_CONTENT_TYPE | _F_RESPONSE_TOPIC | _F_CORRELATION)
    if (n - 1 - optional.bit_count()) % 2 or n < 1 + optional.bit_count():
        raise ValueError("spooled message fields do not match its flags")
    ends = list(accumulate(lengths, initial=pos))
    fields = [b[start:end] for start, end in pairwise(ends)]
    topic = fields[0].decode("utf-8", "surrogatepass")
    i = 1
    payload = key = correlation = None
    content_type = response_topic = None
    if flags & _F_PAYLOAD:
        payload = fields[i]
        i += 1
    if flags & _F_KEY:
        key = fields[i]
        i += 1
    if flags & _F_CONTENT_TYPE:
        content_type = fields[i].decode("utf-8", "surrogatepass")
        i += 1
    if flags & _F_RESPONSE_TOPIC:
        response_topic = fields[i].decode("utf-8", "surrogatepass")
        i += 1
    if flags & _F_CORRELATION:
        correlation = fields[i]
        i += 1
    strs = [f.decode("utf-8", "surrogatepass") for f in fields[i:]]
    headers = tuple(zip(strs[::2], strs[1::2], strict=True))
    msg = Outbound(
        topic=topic,
        payload=payload,
        key=key,
        headers=headers,
        content_type=content_type,
        qos=qos,
        retain=bool(flags & _F_RETAIN),
        message_expiry=expiry if flags & _F_EXPIRY else None,
        response_topic=response_topic,
        correlation_data=correlation,
    )
    return msg, received_at


class SpoolCodec:
    """`encode_outbound` and `decode_outbound` as one object (the runtime's codec seam)."""

    def encode(self, message: Outbound, received_at: float) -> bytes:
        """See `encode_outbound`."""
        return encode_outbound(message, received_at)

    def decode(self, blob: bytes) -> tuple[Outbound, float]:
        """See `decode_outbound`."""
        return decode_outbound(blob)
