"""The room→bus spool: order across reopen, removal, byte limits, expiry, SIGKILL, the codec."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.envelope import Outbound
from bridge.spool import (
    SPOOL_FILE,
    Overflow,
    Spool,
    SpoolError,
    decode_outbound,
    encode_outbound,
)

REPO = Path(__file__).resolve().parents[2]


def must(seq: int | None) -> int:
    """The seq of an append that must have been stored."""
    assert seq is not None
    return seq


def open_spool(path: Path, max_bytes: int = 1 << 30, max_age: float | None = None) -> Spool:
    return Spool.open(path / SPOOL_FILE, max_bytes=max_bytes, max_age=max_age)


# ----------------------------------------------------------------------------- order, removal


def test_order_and_content_survive_reopen(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool:
        a = spool.route("a")
        b = spool.route("b", overflow="drop_oldest")
        seqs_a = [must(a.append(f"k{i % 3}", b"a%d" % i)) for i in range(5)]
        seqs_a += map(must, a.append_many([(f"k{i % 3}", b"a%d" % i) for i in range(5, 50)]))
        b.append_many([("x", b"b1"), ("y", b"b2")])
    assert seqs_a == sorted(seqs_a) and len(set(seqs_a)) == 50

    with open_spool(tmp_path) as spool:
        a = spool.route("a")
        b = spool.route("b")
        assert (a.count, a.bytes) == (50, sum(len(b"a%d" % i) for i in range(50)))
        rows = a.pending(1000)
        assert [r[0] for r in rows] == seqs_a
        assert [(r[1], r[2]) for r in rows] == [(f"k{i % 3}", b"a%d" % i) for i in range(50)]
        # Paging with a cursor sees the same sequence.
        paged = []
        cursor = 0
        while page := a.pending(7, after_seq=cursor):
            paged += page
            cursor = page[-1][0]
        assert paged == rows
        assert [(k, p) for _, k, p in b.pending(10)] == [("x", b"b1"), ("y", b"b2")]
        # New appends continue after the old ones.
        assert must(a.append("k0", b"new")) > seqs_a[-1]


def test_remove_out_of_order_and_seqs_never_reused(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool:
        r = spool.route("r")
        seqs = [s for s in r.append_many([("k", bytes([i]) * (i + 1)) for i in range(10)]) if s]
        assert r.remove([seqs[7], seqs[2], seqs[9]]) == 3
        assert r.remove([seqs[2], 10_000]) == 0  # already gone, never there
        assert r.remove([]) == 0
        left = [seqs[i] for i in (0, 1, 3, 4, 5, 6, 8)]
        assert [row[0] for row in r.pending(100)] == left
        assert r.count == 7
        assert r.bytes == sum(i + 1 for i in (0, 1, 3, 4, 5, 6, 8))
        assert r.remove(reversed(left)) == 7
        assert (r.count, r.bytes) == (0, 0)
        assert r.counters["spool.removed"] == 10
        assert r.counters["spool.appended"] == 10
        last = seqs[-1]
        # The table is empty: a new append still gets a higher seq, also after a reopen.
        s1 = must(r.append("k", b"x"))
        assert s1 > last
        r.remove([s1])
    with open_spool(tmp_path) as spool:
        r = spool.route("r")
        assert (r.count, r.bytes) == (0, 0)
        assert must(r.append("k", b"y")) > s1


def test_remove_many_at_once(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool:
        r = spool.route("r")
        seqs = [s for s in r.append_many([("k", b"p")] * 3000) if s]
        random.Random(1).shuffle(seqs)
        assert r.remove(seqs[:2500]) == 2500
        assert sorted(row[0] for row in r.pending(5000)) == sorted(seqs[2500:])
        assert (r.count, r.bytes) == (500, 500)


def test_wal_stays_bounded_under_many_small_commits(tmp_path: Path) -> None:
    """SQLite's checkpoints run (the WAL starts over), so the files do not grow with traffic."""
    with open_spool(tmp_path) as spool:
        r = spool.route("r")
        payload = bytes(256)
        live = [must(r.append("k", payload)) for _ in range(100)]
        for _ in range(6000):
            live.append(must(r.append("k", payload)))
            r.remove([live.pop(0)])
        wal = tmp_path / f"{SPOOL_FILE}-wal"
        assert wal.stat().st_size <= 8 << 20  # journal_size_limit; ~6000 x 2 pages were written
        assert (tmp_path / SPOOL_FILE).stat().st_size < 1 << 20
        assert (r.count, r.counters["spool.appended"]) == (100, 6100)


# ----------------------------------------------------------------------------- limits


def test_drop_newest_counts_exactly(tmp_path: Path) -> None:
    with open_spool(tmp_path, max_bytes=1000) as spool:
        r = spool.route("r", overflow="drop_newest")
        out = [r.append("k", bytes(100)) for _ in range(12)]
        stored = [must(s) for s in out[:10]]
        assert stored == sorted(stored)
        assert out[10:] == [None, None]
        assert (r.count, r.bytes) == (10, 1000)
        assert r.append("k", b"") is not None  # an empty payload always fits
        assert r.append_many([("k", b"x")] * 3) == [None] * 3
        r.remove([stored[0]])
        got = r.append_many([("k", bytes(60)), ("k", bytes(50)), ("k", bytes(40))])
        assert got[0] is not None and got[1] is None and got[2] is not None
        assert r.bytes == 1000
        assert r.counters["spool.dropped_overflow"] == 2 + 3 + 1
        assert r.counters["spool.appended"] == 10 + 1 + 2


def test_drop_oldest_evicts_oldest_and_counts_exactly(tmp_path: Path) -> None:
    with open_spool(tmp_path, max_bytes=1000) as spool:
        r = spool.route("r", overflow="drop_oldest")
        seqs = [must(r.append("k", bytes([i]) * 100)) for i in range(10)]
        assert r.bytes == 1000
        s = must(r.append("k", bytes([10]) * 250))  # evicts the three oldest
        assert [row[0] for row in r.pending(100)] == [*seqs[3:], s]
        assert (r.count, r.bytes) == (8, 950)
        assert r.counters["spool.dropped_overflow"] == 3
        # Larger than the whole share: dropped, nothing evicted.
        assert r.append("k", bytes(1001)) is None
        assert (r.count, r.counters["spool.dropped_overflow"]) == (8, 4)
        # A group larger than the share evicts everything stored and its own first members.
        got = r.append_many([("k", bytes([i]) * 300) for i in range(5)])
        assert got[:2] == [None, None] and None not in got[2:]
        assert [row[2][0] for row in r.pending(100)] == [2, 3, 4]
        assert r.bytes == 900
        assert r.counters["spool.dropped_overflow"] == 4 + 8 + 2
        # A removal of an evicted message is a no-op.
        assert r.remove([seqs[5]]) == 0


def test_byte_limit_is_split_between_routes(tmp_path: Path) -> None:
    with open_spool(tmp_path, max_bytes=1000) as spool:
        a = spool.route("a")
        assert a.max_bytes == 1000
        b = spool.route("b")
        assert (a.max_bytes, b.max_bytes) == (500, 500)
        assert [a.append("k", bytes(200)) is not None for _ in range(3)] == [True, True, False]
        # A full route does not take the other's share.
        assert [b.append("k", bytes(250)) is not None for _ in range(3)] == [True, True, False]
        assert spool.bytes == 900
        assert spool.count == 4


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["drop_newest", "drop_oldest"]),
    quota=st.integers(1, 300),
    sizes=st.lists(st.integers(0, 120), max_size=40),
    cuts=st.lists(st.integers(1, 8), max_size=40),
    removes=st.lists(st.integers(0, 39), max_size=10),
)
def test_group_commits_match_one_by_one(
    policy: Overflow, quota: int, sizes: list[int], cuts: list[int], removes: list[int]
) -> None:
    """append_many, however the messages are grouped, ends as a simple sequential model does."""
    # The model: a FIFO of (index, size) under the policy, one message at a time.
    stored: deque[tuple[int, int]] = deque()
    total = dropped = 0
    for i, size in enumerate(sizes):
        if policy == "drop_newest":
            if total + size > quota:
                dropped += 1
                continue
        else:
            if size > quota:
                dropped += 1
                continue
            while total + size > quota:
                total -= stored.popleft()[1]
                dropped += 1
        stored.append((i, size))
        total += size

    with tempfile.TemporaryDirectory() as tmp:
        with open_spool(Path(tmp), max_bytes=quota) as spool:
            r = spool.route("r", overflow=policy)
            index_of: dict[int, int] = {}
            pos = 0
            for cut in [*cuts, len(sizes)]:
                group = list(range(pos, min(pos + cut, len(sizes))))
                pos += len(group)
                got = r.append_many([(f"k{i}", bytes(sizes[i])) for i in group])
                for i, seq in zip(group, got, strict=True):
                    if seq is not None:
                        index_of[seq] = i
                if pos >= len(sizes):
                    break
            rows = r.pending(1000)
            assert [index_of[seq] for seq, _, _ in rows] == [i for i, _ in stored]
            assert [k for _, k, _ in rows] == [f"k{i}" for i, _ in stored]
            assert (r.count, r.bytes) == (len(stored), total)
            assert r.counters["spool.dropped_overflow"] == dropped
            assert r.counters["spool.appended"] == len(index_of)
            # Removing some keeps the running totals equal to what is stored.
            gone = {rows[j][0] for j in removes if j < len(rows)}
            assert r.remove(gone) == len(gone)
            left = r.pending(1000)
            assert (r.count, r.bytes) == (len(left), sum(len(p) for _, _, p in left))
        with open_spool(Path(tmp), max_bytes=quota) as spool:
            r = spool.route("r", overflow=policy)
            assert (r.count, r.bytes) == (len(left), sum(len(p) for _, _, p in left))


# ----------------------------------------------------------------------------- expiry


def test_expiry_removes_old_messages_and_counts_them(tmp_path: Path) -> None:
    now = time.time()
    with open_spool(tmp_path, max_age=60) as spool:
        r = spool.route("r")
        old = r.append_many([("k", b"o" * 10)] * 5, at=now - 120)
        young = must(r.append("k", b"y", at=now - 30))
        late_old = must(r.append("k", b"z", at=now - 500))  # behind a young one: waits for it
        assert r.oldest_age is not None and 119 < r.oldest_age < 200
        assert r.expire(limit=3) == 3
        assert spool.expire() == 2
        assert spool.expire() == 0
        assert [row[0] for row in r.pending(10)] == [young, late_old]
        assert (r.count, r.bytes) == (2, 2)
        assert r.counters["spool.expired"] == 5
        assert None not in old
        assert r.oldest_age is not None and 29 < r.oldest_age < 100
    with open_spool(tmp_path, max_age=None) as spool:
        r = spool.route("r")
        assert r.expire() == 0  # no max_age: nothing expires
        r.remove([young, late_old])
        assert r.oldest_age is None


# ----------------------------------------------------------------------------- transactions


def test_batch_is_one_commit_and_rolls_back_whole(tmp_path: Path) -> None:
    with open_spool(tmp_path, max_bytes=10_000) as spool:
        a = spool.route("a")
        b = spool.route("b")
        first = must(a.append("k", b"keep"))
        with spool.batch():
            a.append_many([("k", b"1"), ("k", b"2")])
            b.append("k", b"3")
            a.remove([first])
            assert spool.count == 3  # visible inside the batch
        assert (a.count, b.count) == (2, 1)
        before = (a.count, a.bytes, a.counters, b.count, b.bytes, b.counters)
        with pytest.raises(RuntimeError, match="boom"), spool.batch():
            a.append("k", b"lost")
            b.remove([row[0] for row in b.pending(10)])
            raise RuntimeError("boom")
        assert (a.count, a.bytes, a.counters, b.count, b.bytes, b.counters) == before
        assert [p for _, _, p in a.pending(10)] == [b"1", b"2"]
        assert [p for _, _, p in b.pending(10)] == [b"3"]
    with open_spool(tmp_path) as spool:
        assert spool.count == 3


def test_one_process_at_a_time_and_closed_is_closed(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    r = spool.route("r")
    r.append("k", b"x")
    with pytest.raises(SpoolError, match="in use by another process"):
        open_spool(tmp_path)
    spool.close()
    spool.close()  # harmless
    with pytest.raises(SpoolError, match="closed"):
        r.append("k", b"y")
    with open_spool(tmp_path) as again:
        assert again.route("r").count == 1


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        open_spool(tmp_path, max_bytes=0)
    with pytest.raises(ValueError, match="max_age"):
        open_spool(tmp_path, max_age=0)
    with open_spool(tmp_path) as spool:
        spool.route("r")
        with pytest.raises(ValueError, match="already open"):
            spool.route("r")
        with pytest.raises(ValueError, match="overflow"):
            spool.route("s", overflow="block")
        with spool.batch(), pytest.raises(ValueError, match="outside a batch"):
            spool.route("t")
        with spool.batch(), pytest.raises(ValueError, match="outside a batch"):
            spool.discard_route("t")


def test_routes_not_opened_keep_their_messages_until_discarded(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool:
        spool.route("gone").append_many([("k", b"abc")] * 4)
        spool.route("kept").append("k", b"z")
    with open_spool(tmp_path) as spool:
        spool.route("kept")
        assert spool.stale_routes() == {"gone": 4}
        assert (spool.count, spool.bytes) == (5, 13)
        with pytest.raises(ValueError, match="is open"):
            spool.discard_route("kept")
        assert spool.discard_route("gone") == 4
        assert spool.discard_route("never") == 0
        assert spool.stale_routes() == {}
        assert (spool.count, spool.bytes) == (1, 1)
    with open_spool(tmp_path) as spool:
        assert spool.route("gone").count == 0


# ----------------------------------------------------------------------------- SIGKILL

CHILD = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from bridge.envelope import Outbound
    from bridge.spool import Spool, encode_outbound

    path, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    spool = Spool.open(path, max_bytes=1 << 30, max_age=None)
    route = spool.route("room:lobby->kafka:events")
    out = sys.stdout
    n = 0
    live = []
    while n < 1_000_000:
        group = rng.choice((1, 1, 1, 5, 20))
        items = []
        for _ in range(group):
            o = Outbound(topic="events", payload=b"%d" % n + bytes(rng.randrange(300)))
            items.append((f"k{n % 7}", encode_outbound(o, float(n))))
            n += 1
        seqs = route.append_many(items)
        out.write("".join(f"A {s}\\n" for s in seqs))
        out.flush()
        live += seqs
        if len(live) > 50 and rng.random() < 0.3:
            gone = rng.sample(live, 10)
            out.write("r " + " ".join(map(str, gone)) + "\\n")  # about to remove
            out.flush()
            route.remove(gone)
            out.write("R " + " ".join(map(str, gone)) + "\\n")
            out.flush()
            live = [s for s in live if s not in set(gone)]
    """
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_loses_nothing_that_was_committed(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / SPOOL_FILE
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    kill_after = rng.randrange(50, 3000)
    lines = []
    try:
        for _ in range(kill_after):
            line = child.stdout.readline()
            assert line, f"child ended early: exit {child.poll()}"
            lines.append(line)
        os.kill(child.pid, signal.SIGKILL)
        lines += child.stdout.read().splitlines(keepends=True)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    appended: list[int] = []
    intended: set[int] = set()  # removals started (may or may not have committed)
    removed: set[int] = set()  # removals that returned
    for line in lines:
        if not line.endswith("\n"):
            continue  # cut off by the kill
        tag, *nums = line.split()
        if tag == "A":
            appended.append(int(nums[0]))
        elif tag == "r":
            intended.update(map(int, nums))
        elif tag == "R":
            removed.update(map(int, nums))
    assert len(appended) >= 40

    with Spool.open(path, max_bytes=1 << 30, max_age=None) as spool:
        route = spool.route("room:lobby->kafka:events")
        rows = route.pending(10_000_000)
        seqs = [row[0] for row in rows]
        have = set(seqs)
        # Every append the child saw return is there, unless the child was removing it.
        missing = [s for s in appended if s not in have and s not in intended]
        assert missing == []
        # Every removal the child saw return stays removed.
        assert have & removed == set()
        # At most the group being appended at the kill is there beyond what was reported.
        assert len(have - set(appended)) <= 20
        assert seqs == sorted(seqs)
        # The totals restored at open match the content; every payload decodes, in order.
        assert (route.count, route.bytes) == (len(rows), sum(len(p) for _, _, p in rows))
        order = []
        for _, key, payload in rows:
            msg, received_at = decode_outbound(payload)
            n = int(received_at)
            assert key == f"k{n % 7}"
            assert msg.payload is not None and msg.payload.startswith(b"%d" % n)
            order.append(n)
        assert order == sorted(order)


# ----------------------------------------------------------------------------- codec

# Any str, lone surrogates included: the codec round-trips every Python string.
any_text = st.text(st.characters(blacklist_categories=()), max_size=30)
opt_bytes = st.none() | st.binary(max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    msg=st.builds(
        Outbound,
        topic=any_text,
        payload=opt_bytes,
        key=opt_bytes,
        headers=st.lists(st.tuples(any_text, any_text), max_size=6).map(tuple),
        content_type=st.none() | any_text,
        qos=st.integers(0, 255),
        retain=st.booleans(),
        message_expiry=st.none() | st.integers(-(2**63), 2**63 - 1),
        response_topic=st.none() | any_text,
        correlation_data=opt_bytes,
    ),
    received_at=st.floats(allow_nan=False),
)
def test_codec_round_trip(msg: Outbound, received_at: float) -> None:
    blob = encode_outbound(msg, received_at)
    assert blob[0] == 1  # the version byte
    assert decode_outbound(blob) == (msg, received_at)


def test_codec_rejects_what_it_did_not_write() -> None:
    blob = encode_outbound(Outbound(topic="t", payload=b"abc", headers=(("h", "v"),)), 1.5)
    for bad in (b"", blob[:10], blob[:-1], blob + b"x", b"\x02" + blob[1:]):
        with pytest.raises(ValueError):
            decode_outbound(bad)
    with pytest.raises(ValueError):
        encode_outbound(Outbound(topic="t", payload=None, qos=256), 0.0)
