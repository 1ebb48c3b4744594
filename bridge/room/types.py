"""Shared vocabulary of the room side: limits, counters, received data, feature seams.

The seam is `PacketTransport`, between the connection (`room.py`) and the features built on
data packets (`streams.py`, `rpc.py`).

Features never touch data channels: they send through a `PacketTransport` and are fed inbound
packets by the room's dispatcher, in arrival order, one at a time.
"""

from __future__ import annotations

import enum
import math
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from livekit.protocol import models

if TYPE_CHECKING:
    from bridge.room.delivery import Delivery

# An encoded DataPacket larger than this makes livekit-server close the data channel
# (it reads with a 65,535-byte buffer); the SDKs guard at 64,000 and so do we.
MAX_DATA_PACKET_BYTES = 64_000
# Stream chunks and headers stay within this many bytes, as in every LiveKit SDK.
STREAM_CHUNK_SIZE = 15_000
# RPC v1 request and response payloads, UTF-8 bytes.
MAX_RPC_V1_PAYLOAD_BYTES = 15_360
# Lossy payloads above this are split by aiortc into several SCTP fragments; any lost fragment
# loses the message. Not enforced (the channel limit is), only logged once per room.
LOSSY_ADVISED_BYTES = 1_200

# client_protocol levels (client-to-client features), see livekit-protocol.md §1.4.
CLIENT_PROTOCOL_DEFAULT = 0
CLIENT_PROTOCOL_DATA_STREAM_RPC = 1
CLIENT_PROTOCOL_DATA_STREAM_V2 = 2


class DataPacketKind(enum.IntEnum):
    """Which channel a packet travels on (values as in `models.DataPacket.Kind`)."""

    KIND_RELIABLE = 0
    KIND_LOSSY = 1


@dataclass(frozen=True, slots=True)
class DataPacket:
    """A user data packet received from the room (named as in the official SDK)."""

    data: bytes
    kind: DataPacketKind
    participant_identity: str  # "" when sent through the server API or by a hidden participant
    participant_sid: str
    topic: str | None = None
    destination_identities: tuple[str, ...] = ()
    # It came end-to-end encrypted (an E2EE room, `bridge.room.e2ee`) and we decrypted it.
    encrypted: bool = False


# Upper bounds (seconds) of the latency histograms' buckets: from a fast loopback hop (~1 ms)
# to a message that waited out a broker outage; above the last one is +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# How many recent errors `Counters.note_error` keeps for the status page.
RECENT_ERRORS = 50


class Histogram:
    """Observations in fixed buckets: per-bucket counts (the last one is +Inf) and their sum.

    Lock-free and allocation-free per observation (one bisect into a tuple, two additions):
    it runs once per message on the event loop.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (Prometheus ``le`` semantics: a bucket includes its bound)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations in total."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that), ending with (+Inf, count)."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class Counters(Counter[str]):
    """Named event counts of one room or one bridge (drops, malformed input, duplicates, ...).

    Every deliberate drop and every rejected input is counted here, so operators can see it;
    names are dotted, e.g. ``packets.lossy_dropped``, ``streams.chunk_gap``. Beside the counts:
    latency histograms by name (`observe`), and the last error per route with the most recent
    errors overall (`note_error`), which `/metrics` and `/status` read (`bridge.metrics`).
    """

    def __init__(self, *args: Any, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.histograms: dict[str, Histogram] = {}
        # route (or other subject) -> (epoch seconds, what went wrong)
        self.last_error: dict[str, tuple[float, str]] = {}
        self.recent_errors: deque[tuple[float, str, str]] = deque(maxlen=RECENT_ERRORS)

    def inc(self, name: str, n: int = 1) -> None:
        """Add `n` to the count called `name`."""
        self[name] += n

    def observe(self, name: str, seconds: float) -> None:
        """Add one observation (e.g. a latency in seconds) to the histogram called `name`."""
        histogram = self.histograms.get(name)
        if histogram is None:
            histogram = self.histograms[name] = Histogram()
        histogram.observe(seconds)

    def note_error(self, subject: str, message: str) -> None:
        """Remember `message` as the last error of `subject` (a route name) and a recent one."""
        now = time.time()
        self.last_error[subject] = (now, message)
        self.recent_errors.append((now, subject, message))


class PacketTransport(Protocol):
    """What streams and RPC need from the connection.

    `send_packet` fills in sequence numbers, enforces `MAX_DATA_PACKET_BYTES` (raising
    `DataPacketTooLargeError` before anything is sent), waits for room on the reliable channel
    (flow control) and drops-and-counts lossy packets when that channel is congested. It raises
    `NotConnectedError` when the room is not connected.
    """

    @property
    def local_identity(self) -> str:
        """Our own participant identity."""
        ...

    @property
    def counters(self) -> Counters:
        """The room's counters."""
        ...

    async def send_packet(self, packet: models.DataPacket, *, reliable: bool = True) -> None:
        """Send one DataPacket to `packet.destination_identities` (empty: the whole room)."""
        ...

    def participant_info(self, identity: str) -> models.ParticipantInfo | None:
        """The latest ParticipantInfo of a remote participant, None if not in the room."""
        ...

    def remote_identities(self) -> Sequence[str]:
        """Identities of every remote participant currently in the room."""
        ...


@runtime_checkable
class TrackingPacketTransport(PacketTransport, Protocol):
    """A `PacketTransport` that can also tell when livekit-server has a packet."""

    async def send_packet_tracked(self, packet: models.DataPacket) -> Delivery:
        """Send one reliable DataPacket; returns once it is queued, with its `Delivery`."""
        ...
