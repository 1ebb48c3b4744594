"""LiveKit data tracks: publish frames on a named track, receive the frames of remote tracks.

A data track is a named, lossy stream of frames (payload + optional 64-bit user timestamp),
forwarded by the SFU to the participants that subscribed to it. It is orthogonal to data
packets: its own signal messages, its own data channel (`_data_track`, unordered, no
retransmission) and a compact binary packet format instead of protobuf. How it works on the
wire, and what the installed SDK does, is written down in `docs/data-tracks.md`.

* Publishing: we pick a non-zero 16-bit `pub_handle`, send `PublishDataTrackRequest`, and the
  server answers `PublishDataTrackResponse{DataTrackInfo{pub_handle, sid, name}}` (or a
  `RequestResponse` refusal echoing the request). Frames are cut into packets of at most
  `TRANSPORT_MTU` bytes, each carrying our `pub_handle`, and sent on `_data_track`.
* Subscribing: never automatic (`auto_subscribe_data_track` is false in our join). We send
  `UpdateDataSubscription{track_sid, subscribe}`; the server answers
  `DataTrackSubscriberHandles{sub_handle -> (publisher identity, publisher sid, track sid)}`
  and then forwards the publisher's packets with the handle rewritten to our `sub_handle`.
  Subscriptions are kept by (publisher identity, track name), so a track published later, or
  again after a rejoin (new sid), is subscribed as soon as it appears.

* End-to-end encryption (a room with an E2EE key, `bridge.room.e2ee`): as the Rust SDK, a
  frame's payload is encrypted whole with the room's data cryptor before it is cut into
  packets, each packet carrying the key index and IV in its E2EE extension; the track is
  published with `encryption=GCM`. Received frames with that extension are decrypted once
  reassembled.

Nothing is hidden: a frame that cannot be sent at once (channel congested, not open) is dropped
and counted, and on the receiving side lost packets (sequence gaps, e.g. the server dropping
packets queued longer than its 100 ms target latency), incomplete frames, encrypted frames
we cannot decrypt (no key, or another one), malformed packets and packets for unknown handles
are all counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiortc import RTCDataChannel
from livekit.protocol import models, rtc

from bridge.room.e2ee import DataCryptor, DecryptError
from bridge.room.errors import NotConnectedError, RoomError
from bridge.room.types import Counters

log = logging.getLogger("roombus.room.data_tracks")

DATA_TRACK_LABEL = "_data_track"
# Largest packet (header included), as the Rust SDK's packetizer (`local/pipeline.rs`).
TRANSPORT_MTU = 16_000
# A frame is dropped while more than this waits in the channel's send buffer: data tracks are
# lossy and latency-bound (the server itself drops what waited over 100 ms).
DATA_TRACK_HIGH_WATER = 256 * 1024
MAX_TRACK_NAME = 256

_BASE = struct.Struct(">BBHHHI")
BASE_HEADER_LEN = _BASE.size  # 12
_VERSION = 0
_FLAG_START = 0x10
_FLAG_FINAL = 0x08
_FLAG_EXT = 0x04
EXT_E2EE = models.DataTrackExtensionID.DTEI_E2EE  # 1
EXT_USER_TIMESTAMP = models.DataTrackExtensionID.DTEI_USER_TIMESTAMP  # 2
_E2EE_LEN = 13
_USER_TIMESTAMP_LEN = 8
CLOCK_RATE = 90_000


class DataTrackError(RoomError):
    """Publishing a data track failed (refused by the server, timed out, not connected)."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class PacketError(ValueError):
    """A data-track packet that does not parse."""


@dataclass(frozen=True, slots=True)
class DataTrackFrame:
    """One frame of a data track: the payload and an optional application timestamp."""

    payload: bytes
    user_timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class DataTrackPacket:
    """One data-track packet (`docs/data-tracks.md`, "Packet format")."""

    handle: int
    sequence: int
    frame_number: int
    timestamp: int
    start: bool
    final: bool
    payload: bytes
    user_timestamp: int | None = None
    # (key index, 12-byte IV) when the payload is end-to-end encrypted.
    e2ee: tuple[int, bytes] | None = None


def encode_packet(packet: DataTrackPacket) -> bytes:
    """The wire bytes of `packet`."""
    if not 0 < packet.handle <= 0xFFFF:
        raise ValueError(f"data track handle {packet.handle} is not a non-zero 16-bit value")
    ext = b""
    if packet.e2ee is not None:
        key_index, iv = packet.e2ee
        ext += struct.pack(">BBB", EXT_E2EE, _E2EE_LEN, key_index) + iv
    if packet.user_timestamp is not None:
        ext += struct.pack(">BBQ", EXT_USER_TIMESTAMP, _USER_TIMESTAMP_LEN, packet.user_timestamp)
    first = _VERSION << 5
    if packet.start:
        first |= _FLAG_START
    if packet.final:
        first |= _FLAG_FINAL
    head = b""
    if ext:
        first |= _FLAG_EXT
        # The 16-bit length L, the extensions and padding take (L + 1) * 4 bytes together.
        words = (2 + len(ext) + 3) // 4
        head = struct.pack(">H", words - 1) + ext + bytes(words * 4 - 2 - len(ext))
    base = _BASE.pack(
        first,
        0,
        packet.handle,
        packet.sequence & 0xFFFF,
        packet.frame_number & 0xFFFF,
        packet.timestamp & 0xFFFFFFFF,
    )
    return base + head + packet.payload


def decode_packet(data: bytes) -> DataTrackPacket:
    """Parse one packet; raises `PacketError` when it is malformed or of another version."""
    if len(data) < BASE_HEADER_LEN:
        raise PacketError(f"{len(data)} bytes: shorter than the 12-byte header")
    first, _reserved, handle, sequence, frame_number, timestamp = _BASE.unpack_from(data)
    version = first >> 5
    if version != _VERSION:
        raise PacketError(f"unsupported packet version {version}")
    if handle == 0:
        raise PacketError("track handle 0")
    offset = BASE_HEADER_LEN
    user_timestamp: int | None = None
    e2ee: tuple[int, bytes] | None = None
    if first & _FLAG_EXT:
        if len(data) < offset + 2:
            raise PacketError("extension flag set but no extension length")
        (words,) = struct.unpack_from(">H", data, offset)
        end = offset + (words + 1) * 4
        if end > len(data):
            raise PacketError("extensions overrun the packet")
        pos = offset + 2
        while pos + 2 <= end:
            tag, length = data[pos], data[pos + 1]
            pos += 2
            if tag == 0:
                continue  # padding
            if pos + length > end:
                raise PacketError(f"extension {tag} overruns the extension block")
            body = data[pos : pos + length]
            pos += length
            if tag == EXT_USER_TIMESTAMP and length >= _USER_TIMESTAMP_LEN:
                (user_timestamp,) = struct.unpack_from(">Q", body)
            elif tag == EXT_E2EE and length >= _E2EE_LEN:
                e2ee = (body[0], bytes(body[1:13]))
            # Unknown extensions are skipped (forward compatible, as the SDKs do).
        offset = end
    return DataTrackPacket(
        handle=handle,
        sequence=sequence,
        frame_number=frame_number,
        timestamp=timestamp,
        start=bool(first & _FLAG_START),
        final=bool(first & _FLAG_FINAL),
        payload=bytes(data[offset:]),
        user_timestamp=user_timestamp,
        e2ee=e2ee,
    )


def header_len(user_timestamp: int | None, e2ee: bool = False) -> int:
    """The header size of a packet with (or without) a user timestamp and E2EE extension."""
    ext = (2 + _USER_TIMESTAMP_LEN if user_timestamp is not None else 0) + (
        2 + _E2EE_LEN if e2ee else 0
    )
    return BASE_HEADER_LEN + (((2 + ext + 3) // 4) * 4 if ext else 0)


class Packetizer:
    """Cuts frames into packets for one published track (sequence, frame number, clock)."""

    def __init__(
        self, handle: int, mtu: int = TRANSPORT_MTU, e2ee: DataCryptor | None = None
    ) -> None:
        self.handle = handle
        self.mtu = mtu
        self.e2ee = e2ee  # encrypts every frame (an E2EE track)
        self.sequence = 0
        self.frame_number = 0
        self._clock_base = random.getrandbits(32)

    def timestamp(self) -> int:
        """Now on the track's 90 kHz clock (random origin, as RTP)."""
        return (self._clock_base + int(time.monotonic() * CLOCK_RATE)) & 0xFFFFFFFF

    def packetize(self, frame: DataTrackFrame) -> list[bytes]:
        """The packets of `frame` (an empty payload makes no packet, as in the Rust SDK)."""
        payload = frame.payload
        e2ee: tuple[int, bytes] | None = None
        if self.e2ee is not None:
            iv, payload = self.e2ee.encrypt(payload)
            e2ee = (self.e2ee.key_index, iv)
        room = self.mtu - header_len(frame.user_timestamp, e2ee is not None)
        chunks = [payload[i : i + room] for i in range(0, len(payload), room)]
        frame_number = self.frame_number
        self.frame_number = (frame_number + 1) & 0xFFFF
        stamp = self.timestamp()
        out: list[bytes] = []
        for index, chunk in enumerate(chunks):
            out.append(
                encode_packet(
                    DataTrackPacket(
                        handle=self.handle,
                        sequence=self.sequence,
                        frame_number=frame_number,
                        timestamp=stamp,
                        start=index == 0,
                        final=index == len(chunks) - 1,
                        payload=chunk,
                        user_timestamp=frame.user_timestamp,
                        e2ee=e2ee,
                    )
                )
            )
            self.sequence = (self.sequence + 1) & 0xFFFF
        return out


class Depacketizer:
    """Reassembles the frames of one subscribed track; counts what it loses.

    One partial frame at a time (the Rust SDK's default `max_partial_frames=1`): a packet that
    does not continue it (other frame, sequence gap) discards it.
    """

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._last_sequence: int | None = None
        self._frame: int | None = None
        self._next_sequence = 0
        self._parts: list[bytes] = []

    def push(self, packet: DataTrackPacket) -> DataTrackFrame | None:
        """Feed one packet; returns the frame it completes, if any."""
        last = self._last_sequence
        if last is not None:
            gap = (packet.sequence - last - 1) & 0xFFFF
            if gap < 0x8000:
                if gap:
                    self._counters.inc("data_tracks.packets_lost", gap)
                self._last_sequence = packet.sequence
            else:
                self._counters.inc("data_tracks.packets_reordered")
        else:
            self._last_sequence = packet.sequence
        if packet.start:
            self._discard_partial()
            if packet.final:
                return DataTrackFrame(packet.payload, packet.user_timestamp)
            self._frame = packet.frame_number
            self._next_sequence = (packet.sequence + 1) & 0xFFFF
            self._parts = [packet.payload]
            return None
        if self._frame != packet.frame_number or self._next_sequence != packet.sequence:
            same_frame = self._frame == packet.frame_number
            self._discard_partial()
            if not same_frame:
                self._counters.inc("data_tracks.frames_incomplete")  # its start never came
            return None
        self._parts.append(packet.payload)
        self._next_sequence = (packet.sequence + 1) & 0xFFFF
        if not packet.final:
            return None
        payload = b"".join(self._parts)
        self._frame, self._parts = None, []
        return DataTrackFrame(payload, packet.user_timestamp)

    def _discard_partial(self) -> None:
        if self._frame is not None:
            self._counters.inc("data_tracks.frames_incomplete")
            self._frame, self._parts = None, []


@dataclass(frozen=True, slots=True)
class DataTrackInfo:
    """A published data track as the server describes it."""

    sid: str
    name: str
    pub_handle: int
    uses_e2ee: bool

    @classmethod
    def from_proto(cls, info: models.DataTrackInfo) -> DataTrackInfo:
        """From the protobuf `DataTrackInfo`."""
        return cls(
            sid=info.sid,
            name=info.name,
            pub_handle=info.pub_handle,
            uses_e2ee=info.encryption != models.Encryption.Type.NONE,
        )


@dataclass(frozen=True, slots=True)
class DataTrackFrameReceived:
    """A frame of a subscribed remote data track arrived (a `Room` event)."""

    publisher_identity: str
    track_name: str
    track_sid: str
    frame: DataTrackFrame


class LocalDataTrack:
    """A data track we published. `try_push` sends a frame now or drops it, never waits."""

    def __init__(self, manager: DataTrackManager, info: DataTrackInfo) -> None:
        self._manager = manager
        self.info = info
        self._packetizer = Packetizer(info.pub_handle, e2ee=manager.e2ee)
        self._published = True

    def is_published(self) -> bool:
        """Whether frames can still be pushed (false after unpublish or a lost session)."""
        return self._published

    def try_push(self, frame: DataTrackFrame | bytes) -> bool:
        """Send one frame to the track's subscribers; False if it was dropped (counted).

        Raises `NotConnectedError` when the track is no longer published (unpublished, or the
        session it belonged to was lost). A congested or closed channel drops the frame
        (``data_tracks.frames_dropped``): late frames are worthless on a lossy track.
        """
        if not self._published:
            raise NotConnectedError(f"data track {self.info.name!r} is not published")
        if isinstance(frame, bytes | bytearray | memoryview):
            frame = DataTrackFrame(bytes(frame))
        return self._manager.send_frame(self._packetizer, frame)

    async def unpublish(self) -> None:
        """Unpublish the track (idempotent)."""
        if not self._published:
            return
        self._published = False
        await self._manager.unpublish(self)

    def __repr__(self) -> str:
        return f"LocalDataTrack(name={self.info.name!r}, sid={self.info.sid!r})"


@dataclass(slots=True)
class _Subscribed:
    publisher_identity: str
    track_name: str
    track_sid: str
    depacketizer: Depacketizer


@dataclass(slots=True)
class _ManagerSession:
    channel: RTCDataChannel | None = None
    # Track sids we asked to subscribe to in this session.
    requested: set[str] = field(default_factory=set)
    # sub_handle -> subscription, from DataTrackSubscriberHandles.
    handles: dict[int, _Subscribed] = field(default_factory=dict)


class DataTrackManager:
    """Our data tracks of one room: publications, subscriptions, packets in and out."""

    def __init__(
        self,
        counters: Counters,
        *,
        send_signal: Callable[[rtc.SignalRequest], asyncio.Future[None]],
        post_event: Callable[[object], None],
        remote_tracks: Callable[[], Sequence[tuple[str, str, models.DataTrackInfo]]],
        request_timeout: Callable[[], float],
        e2ee: DataCryptor | None = None,
    ) -> None:
        self._counters = counters
        # The room's E2EE key: our tracks are published encrypted, theirs decrypted.
        self.e2ee = e2ee
        self._e2ee_rejected_logged = False
        self._send_signal = send_signal
        self._post_event = post_event
        self._remote_tracks = remote_tracks
        self._request_timeout = request_timeout
        self._next_handle = 1
        self._pending: dict[int, asyncio.Future[DataTrackInfo]] = {}
        self._published: dict[int, LocalDataTrack] = {}
        # (publisher identity, track name) we want frames of.
        self._wanted: set[tuple[str, str]] = set()
        # ... and predicates over (publisher identity, track name) choosing more of them.
        self._wanted_matching: list[Callable[[str, str], bool]] = []
        self._session = _ManagerSession()

    # ----------------------------------------------------------- sessions

    def session_started(self, channel: RTCDataChannel | None) -> None:
        """A new session is up with our `_data_track` channel; resubscribe what we want."""
        self._session = _ManagerSession(channel=channel)
        self.sync_subscriptions()

    def session_lost(self, reason: str) -> None:
        """The session is gone: its handles mean nothing any more."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NotConnectedError(f"data track: {reason}"))
        self._pending.clear()
        for track in self._published.values():
            track._published = False
        self._published.clear()
        self._session = _ManagerSession()

    # ----------------------------------------------------------- publishing

    async def publish(self, name: str) -> LocalDataTrack:
        """Publish a data track called `name`; returns once the server confirmed it."""
        if not 1 <= len(name) <= MAX_TRACK_NAME:
            raise DataTrackError(
                f"data track name must be 1 to {MAX_TRACK_NAME} characters", reason="INVALID_NAME"
            )
        handle = self._allocate_handle()
        future: asyncio.Future[DataTrackInfo] = asyncio.get_running_loop().create_future()
        self._pending[handle] = future
        request = rtc.PublishDataTrackRequest(pub_handle=handle, name=name)
        if self.e2ee is not None:
            request.encryption = models.Encryption.Type.GCM
        try:
            await self._send_signal(rtc.SignalRequest(publish_data_track_request=request))
            async with asyncio.timeout(self._request_timeout()):
                info = await future
        except TimeoutError as exc:
            raise DataTrackError(
                f"data track {name!r}: the server did not confirm the publication "
                f"within {self._request_timeout():.0f} s (a server without data tracks?)",
                reason="TIMEOUT",
            ) from exc
        finally:
            self._pending.pop(handle, None)
        track = LocalDataTrack(self, info)
        self._published[handle] = track
        self._counters.inc("data_tracks.published")
        return track

    def _allocate_handle(self) -> int:
        for _ in range(0xFFFF):
            handle = self._next_handle
            self._next_handle = handle % 0xFFFF + 1
            if handle not in self._pending and handle not in self._published:
                return handle
        raise DataTrackError("no free data track handle", reason="LIMIT_EXCEEDED")

    async def unpublish(self, track: LocalDataTrack) -> None:
        """Tell the server (best effort) and forget the track."""
        handle = track.info.pub_handle
        if self._published.get(handle) is track:
            del self._published[handle]
        request = rtc.UnpublishDataTrackRequest(pub_handle=handle)
        with contextlib.suppress(NotConnectedError):
            await self._send_signal(rtc.SignalRequest(unpublish_data_track_request=request))
        self._counters.inc("data_tracks.unpublished")

    def send_frame(self, packetizer: Packetizer, frame: DataTrackFrame) -> bool:
        """Packetize and send `frame` now, or drop it whole (counted)."""
        channel = self._session.channel
        if channel is None or channel.readyState != "open":
            self._counters.inc("data_tracks.frames_dropped")
            self._counters.inc("data_tracks.frames_dropped.not_open")
            return False
        if channel.bufferedAmount > DATA_TRACK_HIGH_WATER:
            self._counters.inc("data_tracks.frames_dropped")
            self._counters.inc("data_tracks.frames_dropped.congested")
            return False
        for packet in packetizer.packetize(frame):
            channel.send(packet)
        self._counters.inc("data_tracks.frames_sent")
        return True

    # ----------------------------------------------------------- subscribing

    def subscribe(self, publisher_identity: str, track_name: str) -> None:
        """Receive the frames of `publisher_identity`'s track `track_name`.

        Now, or once it is published, and again after rejoins, until `unsubscribe`.
        """
        self._wanted.add((publisher_identity, track_name))
        self.sync_subscriptions()

    def subscribe_matching(self, match: Callable[[str, str], bool]) -> Callable[[], None]:
        """Receive the frames of every track for which `match(identity, name)` is true.

        As `subscribe`, for tracks published now, later, and again after rejoins. Returns a
        function that forgets `match` (tracks already subscribed stay subscribed).
        """
        self._wanted_matching.append(match)
        self.sync_subscriptions()

        def forget() -> None:
            with contextlib.suppress(ValueError):
                self._wanted_matching.remove(match)

        return forget

    def _wants(self, identity: str, name: str) -> bool:
        return (identity, name) in self._wanted or any(
            match(identity, name) for match in self._wanted_matching
        )

    def unsubscribe(self, publisher_identity: str, track_name: str) -> None:
        """Stop receiving that track's frames."""
        self._wanted.discard((publisher_identity, track_name))
        session = self._session
        for identity, _sid, info in self._remote_tracks():
            if (identity, info.name) == (publisher_identity, track_name):
                session.requested.discard(info.sid)
                self._request_subscription(info.sid, subscribe=False)
        for handle, sub in list(session.handles.items()):
            if (sub.publisher_identity, sub.track_name) == (publisher_identity, track_name):
                del session.handles[handle]

    def sync_subscriptions(self) -> None:
        """Ask for every wanted track now visible and not yet requested in this session."""
        session = self._session
        if session.channel is None or not (self._wanted or self._wanted_matching):
            return
        for identity, _sid, info in self._remote_tracks():
            if info.sid not in session.requested and self._wants(identity, info.name):
                session.requested.add(info.sid)
                self._request_subscription(info.sid, subscribe=True)

    def _request_subscription(self, track_sid: str, *, subscribe: bool) -> None:
        update = rtc.UpdateDataSubscription.Update(track_sid=track_sid, subscribe=subscribe)
        request = rtc.SignalRequest(
            update_data_subscription=rtc.UpdateDataSubscription(updates=[update])
        )
        try:
            future = self._send_signal(request)
        except NotConnectedError:
            return  # the next session resubscribes
        future.add_done_callback(_log_send_failure)

    # ----------------------------------------------------------- inbound

    def on_signal(self, msg: rtc.SignalResponse, kind: str) -> bool:
        """Handle a data-track signal message; False if `kind` is not one."""
        if kind == "publish_data_track_response":
            info = DataTrackInfo.from_proto(msg.publish_data_track_response.info)
            future = self._pending.get(info.pub_handle)
            if future is not None and not future.done():
                future.set_result(info)
        elif kind == "unpublish_data_track_response":
            handle = msg.unpublish_data_track_response.info.pub_handle
            track = self._published.pop(handle, None)
            if track is not None:
                track._published = False  # by the server (or confirming ours)
        elif kind == "data_track_subscriber_handles":
            self._on_subscriber_handles(msg.data_track_subscriber_handles)
        elif kind == "request_response" and msg.request_response.HasField("publish_data_track"):
            response = msg.request_response
            handle = response.publish_data_track.pub_handle
            future = self._pending.get(handle)
            if future is not None and not future.done():
                reason = rtc.RequestResponse.Reason.Name(response.reason)
                future.set_exception(
                    DataTrackError(
                        f"data track {response.publish_data_track.name!r}: the server refused "
                        f"the publication: {reason}: {response.message}",
                        reason=reason,
                    )
                )
        else:
            return False
        return True

    def _on_subscriber_handles(self, handles: rtc.DataTrackSubscriberHandles) -> None:
        # The message carries every current handle of ours: it replaces the previous map.
        names = {info.sid: info.name for _i, _s, info in self._remote_tracks()}
        session = self._session
        old = session.handles
        new: dict[int, _Subscribed] = {}
        for handle, published in handles.sub_handles.items():
            previous = old.get(handle)
            if previous is not None and previous.track_sid == published.track_sid:
                new[handle] = previous
                continue
            new[handle] = _Subscribed(
                publisher_identity=published.publisher_identity,
                track_name=names.get(published.track_sid, ""),
                track_sid=published.track_sid,
                depacketizer=Depacketizer(self._counters),
            )
        session.handles = new

    def on_channel_message(self, message: bytes | str) -> None:
        """One message of a `_data_track` channel (ours in single mode, the server's in dual)."""
        if isinstance(message, str):
            self._counters.inc("data_tracks.malformed")
            return
        try:
            packet = decode_packet(message)
        except PacketError as exc:
            self._counters.inc("data_tracks.malformed")
            log.debug("data tracks: dropped a malformed packet: %s", exc)
            return
        sub = self._session.handles.get(packet.handle)
        if sub is None:
            self._counters.inc("data_tracks.unknown_handle")
            return
        self._counters.inc("data_tracks.packets_received")
        if packet.e2ee is not None and self.e2ee is None:
            # We hold no key: an encrypted frame cannot be delivered.
            self._counters.inc("data_tracks.e2ee_dropped")
            self._reject_encrypted(sub, "this room has no E2EE key configured")
            return
        frame = sub.depacketizer.push(packet)
        if frame is None:
            return
        if packet.e2ee is not None:
            assert self.e2ee is not None
            key_index, iv = packet.e2ee  # the same on every packet of the frame
            try:
                plain = self.e2ee.decrypt(iv, frame.payload, key_index)
            except DecryptError as exc:
                self._counters.inc("data_tracks.e2ee_dropped")
                self._reject_encrypted(sub, f"it does not decrypt: {exc}")
                return
            frame = DataTrackFrame(plain, frame.user_timestamp)
        if not sub.track_name:
            sub.track_name = next(
                (i.name for _p, _s, i in self._remote_tracks() if i.sid == sub.track_sid), ""
            )
        self._counters.inc("data_tracks.frames_received")
        self._post_event(
            DataTrackFrameReceived(
                publisher_identity=sub.publisher_identity,
                track_name=sub.track_name,
                track_sid=sub.track_sid,
                frame=frame,
            )
        )

    def _reject_encrypted(self, sub: _Subscribed, why: str) -> None:
        if not self._e2ee_rejected_logged:
            self._e2ee_rejected_logged = True
            log.warning(
                "data tracks: dropped end-to-end encrypted frames of %r's track %r: %s "
                "(counted as data_tracks.e2ee_dropped; logged once per room)",
                sub.publisher_identity,
                sub.track_name,
                why,
            )


def _log_send_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("data tracks: a subscription update was not sent: %s", future.exception())
