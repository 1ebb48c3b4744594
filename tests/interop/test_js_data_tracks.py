"""Data tracks between our participant and livekit-client (in headless Chromium), both ways.

The browser peer (`tests/interop/js_peers.py`, `tests/js/peer_core.mjs`) publishes a data track
with `publishDataTrack` and pushes frames with `tryPush`, or subscribes to ours with
`RemoteDataTrack.subscribe()` and reports every frame it reads. @livekit/rtc-node 1.1.0 has no
data tracks, so only the browser peer takes part. Our participant runs in both join modes.

Data tracks are lossy (the server drops what would wait too long, `docs/data-tracks.md`), so
each leg first pushes until one frame arrives (that also covers the subscription's round trip),
then pushes a paced series of numbered frames of mixed sizes (some cut into three packets),
half of them with a user timestamp. What arrives must be a subsequence of what was sent, in
order, each payload and timestamp intact, and most of the series must arrive.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.room.data_tracks import DataTrackFrame, DataTrackFrameReceived
from bridge.room.room import Room, RoomOptions
from tests.interop.conftest import eventually, our_peer
from tests.interop.js_peers import JsPeer, js_peer
from tests.services import LiveKitServer

MODES = pytest.mark.parametrize("single", [True, False], ids=["single", "dual"])
COUNT = 100  # frames in a series
INTERVAL = 0.01  # seconds between two frames of a series
BIG = 40_000  # every tenth frame: three packets at the 16,000-byte MTU
# Of COUNT. The server drops what would wait over 100 ms for the browser ("high buffered
# amount"): up to 11 of 100, mostly big ones, were seen lost towards Chromium, none the other way.
MIN_ARRIVED = 60
STAMP = 1_796_000_000_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def series(tag: str, seed: int) -> list[DataTrackFrame]:
    """`COUNT` numbered frames: ``<tag>-<i>:`` then random bytes; even ones time-stamped."""
    rnd = random.Random(seed)
    frames = []
    for i in range(COUNT):
        size = BIG if i % 10 == 9 else rnd.randint(1, 1200)
        payload = f"{tag}-{i:04d}:".encode() + rnd.randbytes(size)
        frames.append(DataTrackFrame(payload, STAMP + i if i % 2 == 0 else None))
    return frames


def check_series(
    sent: list[DataTrackFrame], got: list[DataTrackFrame], tag: str
) -> tuple[int, int]:
    """`got` (the series' frames that arrived) is a subsequence of `sent`, in order and intact.
    Returns (frames arrived, big frames arrived)."""
    prefix = f"{tag}-".encode()
    indices = []
    for frame in got:
        assert frame.payload.startswith(prefix), frame.payload[:20]
        i = int(frame.payload[len(prefix) : len(prefix) + 4])
        assert frame == sent[i], f"frame {i} changed on the way"
        indices.append(i)
    assert indices == sorted(set(indices)), f"out of order or repeated: {indices}"
    assert len(indices) >= MIN_ARRIVED, f"only {len(indices)} of {COUNT} frames arrived"
    big = sum(1 for i in indices if len(sent[i].payload) > BIG)
    assert big >= 1, "no frame cut into packets arrived"
    return len(indices), big


async def settle(count: Callable[[], int], done: Callable[[], bool], quiet: float = 2.0) -> None:
    """Wait until `done()`, or until `count()` has not changed for `quiet` s (at most 20 s)."""
    deadline = time.monotonic() + 20
    last, since = count(), time.monotonic()
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet:
            return


async def sees(js: JsPeer, ours: Room) -> None:
    await eventually(lambda: js.identity in ours.remote_participants, what="ours to see js")
    deadline = time.monotonic() + 15
    while ours.local_identity not in await js.run("remotes"):
        assert time.monotonic() < deadline, "the browser peer never saw ours"
        await asyncio.sleep(0.05)


@MODES
async def test_js_track_to_ours(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, single: bool
) -> None:
    options = RoomOptions(single_peer_connection=single)
    async with (
        our_peer(livekit_server, room_name, "ours", options) as ours,
        js_peer("browser", livekit_server, room_name, "js", tmp_path) as js,
    ):
        await sees(js, ours)
        got: list[DataTrackFrameReceived] = []
        ours.on(DataTrackFrameReceived, got.append)
        published = await js.run("publish_data_track", name="js-telemetry")
        assert published["sid"].startswith("DTR_"), published
        await eventually(
            lambda: ours.remote_data_tracks.get("js") == ["js-telemetry"], what="the js track"
        )
        assert ours.counters["data_tracks.packets_received"] == 0  # not subscribed yet
        ours.subscribe_data_track("js", "js-telemetry")

        deadline = time.monotonic() + 15
        while not got:
            assert time.monotonic() < deadline, "no warm-up frame from js within 15 s"
            await js.run("push_data_track", name="js-telemetry", frames=[b64(b"warm-up")])
            await asyncio.sleep(0.2)
        first = got[0]
        assert (first.publisher_identity, first.track_name, first.track_sid) == (
            "js",
            "js-telemetry",
            published["sid"],
        )
        assert first.frame == DataTrackFrame(b"warm-up")

        sent = series("js", seed=1)
        result = await js.run(
            "push_data_track",
            name="js-telemetry",
            frames=[b64(f.payload) for f in sent],
            user_timestamps=[f.user_timestamp for f in sent],
            interval_ms=int(INTERVAL * 1000),
        )
        assert result["pushed"] == COUNT, result  # livekit-client refused none

        def arrived() -> list[DataTrackFrame]:
            return [e.frame for e in got if e.frame.payload.startswith(b"js-")]

        await settle(lambda: len(arrived()), lambda: len(arrived()) == COUNT)
        n, big = check_series(sent, arrived(), "js")
        print(f"js -> ours ({'single' if single else 'dual'}): {n}/{COUNT} frames, {big}/10 big")
        assert ours.counters["data_tracks.malformed"] == 0
        assert ours.counters["data_tracks.e2ee_dropped"] == 0
        assert ours.counters["data_tracks.frames_received"] == len(got)


@MODES
async def test_our_track_to_js(
    livekit_server: LiveKitServer, room_name: str, tmp_path: Path, single: bool
) -> None:
    options = RoomOptions(single_peer_connection=single)
    async with (
        js_peer("browser", livekit_server, room_name, "js", tmp_path) as js,
        our_peer(livekit_server, room_name, "ours", options) as ours,
    ):
        await sees(js, ours)
        track = await ours.local_participant.publish_data_track("ours-telemetry")
        announced = await js.next_event("data_track_published", timeout=15)
        assert (announced["identity"], announced["name"], announced["sid"]) == (
            "ours",
            "ours-telemetry",
            track.info.sid,
        )
        subscribed = await js.run("subscribe_data_track", identity="ours", name="ours-telemetry")
        assert subscribed["sid"] == track.info.sid

        def frames() -> list[dict[str, Any]]:
            return js.events_of("data_track_frame")

        deadline = time.monotonic() + 15
        while not frames():
            assert time.monotonic() < deadline, "no warm-up frame at js within 15 s"
            track.try_push(b"warm-up")
            await asyncio.sleep(0.2)
        first = frames()[0]
        assert (first["from"], first["name"], first["sid"]) == (
            "ours",
            "ours-telemetry",
            track.info.sid,
        )
        assert (base64.b64decode(first["data"]), first["user_timestamp"]) == (b"warm-up", None)

        sent = series("ours", seed=2)
        accepted = 0
        for frame in sent:
            accepted += track.try_push(frame)
            await asyncio.sleep(INTERVAL)
        assert accepted == COUNT, ours.counters  # we dropped none

        def arrived() -> list[DataTrackFrame]:
            out = []
            for event in frames():
                payload = base64.b64decode(event["data"])
                if payload.startswith(b"ours-"):
                    stamp = event["user_timestamp"]
                    out.append(DataTrackFrame(payload, None if stamp is None else int(stamp)))
            return out

        await settle(lambda: len(arrived()), lambda: len(arrived()) == COUNT)
        assert not js.events_of("data_track_error"), js.events_of("data_track_error")
        n, big = check_series(sent, arrived(), "ours")
        print(f"ours -> js ({'single' if single else 'dual'}): {n}/{COUNT} frames, {big}/10 big")
        assert ours.counters["data_tracks.frames_sent"] >= COUNT + 1
        await track.unpublish()
