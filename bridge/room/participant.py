"""Participants as the application sees them: `LocalParticipant` and `RemoteParticipant`.

`LocalParticipant` carries our actions, named as in the official SDK; `RemoteParticipant` is a
read-only snapshot of someone else.

The participant never imports the room (`bridge.room.room`): as in livekit-rtc, the room builds
it from the parts it needs (our state, the packet senders, the stream and RPC managers, the
own-state updater), so the dependency runs one way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, overload

from livekit.protocol import models

from bridge.room.data_tracks import DataTrackManager, LocalDataTrack
from bridge.room.delivery import Delivery
from bridge.room.packets import user_packet
from bridge.room.rpc import RpcFallbackHandler, RpcHandler, RpcManager
from bridge.room.streams import (
    ByteStreamInfo,
    ByteStreamWriter,
    StreamManager,
    TextStreamInfo,
    TextStreamWriter,
)


class PacketSender(Protocol):
    """Sends one DataPacket (the room's `send_packet`)."""

    async def __call__(self, packet: models.DataPacket, *, reliable: bool = True) -> None:
        """Send `packet` on the reliable or the lossy channel."""


class TrackedPacketSender(Protocol):
    """Sends one reliable DataPacket and returns its `Delivery` (`send_packet_tracked`)."""

    async def __call__(self, packet: models.DataPacket) -> Delivery:
        """Send `packet` reliably; returns once it is queued."""


class OwnStateUpdater(Protocol):
    """Changes our own attributes, metadata or name, confirmed by the server."""

    async def __call__(
        self,
        *,
        attributes: Mapping[str, str] | None = None,
        metadata: str | None = None,
        name: str | None = None,
    ) -> None:
        """Apply the given changes (None: unchanged) once the server confirms them."""


@dataclass(frozen=True, slots=True)
class RemoteParticipant:
    """A snapshot of another participant of the room."""

    sid: str
    identity: str
    name: str
    metadata: str
    attributes: Mapping[str, str]
    kind: int
    state: int
    client_protocol: int

    @classmethod
    def from_info(cls, info: models.ParticipantInfo) -> RemoteParticipant:
        """The snapshot of a ParticipantInfo."""
        return cls(
            sid=info.sid,
            identity=info.identity,
            name=info.name,
            metadata=info.metadata,
            attributes=dict(info.attributes),
            kind=info.kind,
            state=info.state,
            client_protocol=info.client_protocol,
        )

    @property
    def kind_name(self) -> str:
        """The participant kind as LiveKit names it, e.g. ``STANDARD`` or ``AGENT``."""
        return models.ParticipantInfo.Kind.Name(self.kind)


class LocalParticipant:
    """Us in the room: send data, streams and RPCs, and change our own state."""

    def __init__(
        self,
        *,
        info: Callable[[], models.ParticipantInfo],
        send_packet: PacketSender,
        send_packet_tracked: TrackedPacketSender,
        update_own: OwnStateUpdater,
        streams: StreamManager,
        rpc: RpcManager,
        data_tracks: DataTrackManager | None = None,
    ) -> None:
        self._info = info
        self._send_packet = send_packet
        self._send_packet_tracked = send_packet_tracked
        self._update_own = update_own
        self._streams = streams
        self._rpc = rpc
        self._data_tracks = data_tracks

    @property
    def identity(self) -> str:
        """Our identity (from the token)."""
        return self._info().identity

    @property
    def sid(self) -> str:
        """Our participant sid in the current session (changes on every rejoin)."""
        return self._info().sid

    @property
    def name(self) -> str:
        """Our display name."""
        return self._info().name

    @property
    def metadata(self) -> str:
        """Our metadata."""
        return self._info().metadata

    @property
    def attributes(self) -> Mapping[str, str]:
        """Our attributes (a copy)."""
        return dict(self._info().attributes)

    async def publish_data(
        self,
        payload: bytes | str,
        *,
        reliable: bool = True,
        destination_identities: Sequence[str] = (),
        topic: str | None = None,
        wait_delivered: bool = False,
    ) -> None:
        """Send a data packet to the room, or to `destination_identities` only.

        Reliable packets wait while the channel is congested; a lossy packet is dropped (and
        counted as ``packets.lossy_dropped``) instead. An encoded packet over 64,000 bytes raises
        `DataPacketTooLargeError` before anything is sent.

        With `wait_delivered` (reliable packets only; ignored for lossy ones, which promise
        nothing), returns only once livekit-server's SCTP stack has acknowledged the packet,
        and raises `NotConnectedError` (retriable) if the connection was lost first; without
        it, returns once the packet is queued locally. To keep several packets in flight, use
        `publish_data_tracked`.
        """
        if wait_delivered and reliable:
            await (
                await self.publish_data_tracked(
                    payload, destination_identities=destination_identities, topic=topic
                )
            )
            return
        data = payload.encode() if isinstance(payload, str) else payload
        packet = user_packet(data, topic=topic, destination_identities=destination_identities)
        await self._send_packet(packet, reliable=reliable)

    async def publish_data_tracked(
        self,
        payload: bytes | str,
        *,
        destination_identities: Sequence[str] = (),
        topic: str | None = None,
    ) -> Delivery:
        """Send a reliable data packet; returns once it is queued, with its `Delivery`.

        Packets are sent in the order of these calls. ``await delivery`` returns once
        livekit-server has the packet (the SCTP cumulative acknowledgement covers it) and
        raises `NotConnectedError` (retriable: send again after the rejoin) if the connection
        was lost first. Raises like `publish_data` before anything is sent.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        packet = user_packet(data, topic=topic, destination_identities=destination_identities)
        return await self._send_packet_tracked(packet)

    # --- data tracks (bridge.room.data_tracks) ---

    async def publish_data_track(self, name: str) -> LocalDataTrack:
        """Publish a data track called `name`; returns once the server confirmed it.

        Push frames with `LocalDataTrack.try_push`. Raises `DataTrackError` when the server
        refuses (e.g. DUPLICATE_NAME, NOT_ALLOWED without canPublishData) or does not answer,
        `NotConnectedError` without a session. The track ends with the session (a rejoin
        needs a new publication).
        """
        if self._data_tracks is None:
            raise NotImplementedError("this participant has no data tracks")
        return await self._data_tracks.publish(name)

    # --- streams (bridge.room.streams) ---

    async def send_text(
        self,
        text: str,
        *,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        reply_to_id: str | None = None,
        attachments: Sequence[str | os.PathLike[str]] = (),
        wait_delivered: bool = False,
    ) -> TextStreamInfo:
        """Send a whole text as a text stream.

        With `wait_delivered`, returns only once livekit-server has acknowledged the stream's
        last packet (so all of it), raising `NotConnectedError` if the connection was lost first.
        """
        return await self._streams.send_text(
            text,
            topic=topic,
            destination_identities=destination_identities,
            attributes=attributes,
            reply_to_id=reply_to_id,
            attachments=attachments,
            wait_delivered=wait_delivered,
        )

    async def stream_text(
        self,
        *,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        total_size: int | None = None,
        reply_to_id: str | None = None,
    ) -> TextStreamWriter:
        """Open a text stream to write incrementally (e.g. streamed LLM output)."""
        return await self._streams.stream_text(
            topic=topic,
            destination_identities=destination_identities,
            attributes=attributes,
            total_size=total_size,
            reply_to_id=reply_to_id,
        )

    async def send_bytes(
        self,
        data: bytes,
        *,
        name: str = "unknown",
        mime_type: str = "application/octet-stream",
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        wait_delivered: bool = False,
    ) -> ByteStreamInfo:
        """Send bytes as a byte stream (`wait_delivered` as in `send_text`)."""
        return await self._streams.send_bytes(
            data,
            name=name,
            mime_type=mime_type,
            topic=topic,
            destination_identities=destination_identities,
            attributes=attributes,
            wait_delivered=wait_delivered,
        )

    async def send_file(
        self,
        file_path: str | os.PathLike[str],
        *,
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        mime_type: str | None = None,
        name: str | None = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> ByteStreamInfo:
        """Send a file as a byte stream, reading it piece by piece."""
        return await self._streams.send_file(
            file_path,
            topic=topic,
            destination_identities=destination_identities,
            attributes=attributes,
            mime_type=mime_type,
            name=name,
            on_progress=on_progress,
        )

    async def stream_bytes(
        self,
        name: str,
        *,
        total_size: int | None = None,
        mime_type: str = "application/octet-stream",
        topic: str = "",
        destination_identities: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
    ) -> ByteStreamWriter:
        """Open a byte stream to write incrementally."""
        return await self._streams.stream_bytes(
            name,
            total_size=total_size,
            mime_type=mime_type,
            topic=topic,
            destination_identities=destination_identities,
            attributes=attributes,
        )

    # --- RPC (bridge.room.rpc) ---

    async def perform_rpc(
        self,
        *,
        destination_identity: str,
        method: str,
        payload: str,
        response_timeout: float = 15.0,
    ) -> str:
        """Call `method` on another participant; raises `RpcError` on any failure."""
        return await self._rpc.perform_rpc(
            destination_identity=destination_identity,
            method=method,
            payload=payload,
            response_timeout=response_timeout,
        )

    @overload
    def register_rpc_method(self, method: str, handler: RpcHandler) -> RpcHandler: ...
    @overload
    def register_rpc_method(
        self, method: str, handler: None = None
    ) -> Callable[[RpcHandler], RpcHandler]: ...
    def register_rpc_method(
        self, method: str, handler: RpcHandler | None = None
    ) -> RpcHandler | Callable[[RpcHandler], RpcHandler]:
        """Answer calls of `method` with `handler` (one per method); a decorator without it."""
        return self._rpc.register_rpc_method(method, handler)

    def unregister_rpc_method(self, method: str) -> None:
        """Stop answering `method` (callers then get UNSUPPORTED_METHOD)."""
        self._rpc.unregister_rpc_method(method)

    def set_rpc_fallback_handler(self, fallback: RpcFallbackHandler | None) -> None:
        """Resolve methods without a registered handler through `fallback` (see `RpcManager`)."""
        self._rpc.set_fallback_handler(fallback)

    # --- our own state ---

    async def set_attributes(self, attributes: Mapping[str, str]) -> None:
        """Merge `attributes` into ours; an empty value deletes that key.

        Waits for the server's confirmation; a refusal (e.g. the token lacks
        `canUpdateOwnMetadata`, or the size limit) raises `StateUpdateError`.
        """
        await self._update_own(attributes=attributes)

    async def set_metadata(self, metadata: str) -> None:
        """Replace our metadata (the server treats an empty string as "unchanged")."""
        await self._update_own(metadata=metadata)

    async def set_name(self, name: str) -> None:
        """Replace our display name (the server treats an empty string as "unchanged")."""
        await self._update_own(name=name)

    def __repr__(self) -> str:
        return f"LocalParticipant(identity={self.identity!r}, sid={self.sid!r})"
