"""Participants as the application sees them: `LocalParticipant` and `RemoteParticipant`.

`LocalParticipant` carries our actions, named as in the official SDK; `RemoteParticipant` is a
read-only snapshot of someone else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

from livekit.protocol import models

from bridge.room.packets import user_packet
from bridge.room.rpc import RpcFallbackHandler, RpcHandler
from bridge.room.streams import (
    ByteStreamInfo,
    ByteStreamWriter,
    TextStreamInfo,
    TextStreamWriter,
)

if TYPE_CHECKING:
    from bridge.room.room import Room


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

    def __init__(self, room: Room) -> None:
        self._room = room

    @property
    def identity(self) -> str:
        """Our identity (from the token)."""
        return self._room._state.local.identity

    @property
    def sid(self) -> str:
        """Our participant sid in the current session (changes on every rejoin)."""
        return self._room._state.local.sid

    @property
    def name(self) -> str:
        """Our display name."""
        return self._room._state.local.name

    @property
    def metadata(self) -> str:
        """Our metadata."""
        return self._room._state.local.metadata

    @property
    def attributes(self) -> Mapping[str, str]:
        """Our attributes (a copy)."""
        return dict(self._room._state.local.attributes)

    async def publish_data(
        self,
        payload: bytes | str,
        *,
        reliable: bool = True,
        destination_identities: Sequence[str] = (),
        topic: str | None = None,
    ) -> None:
        """Send a data packet to the room, or to `destination_identities` only.

        Reliable packets wait while the channel is congested; a lossy packet is dropped (and
        counted as ``packets.lossy_dropped``) instead. An encoded packet over 64,000 bytes raises
        `DataPacketTooLargeError` before anything is sent.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        packet = user_packet(data, topic=topic, destination_identities=destination_identities)
        await self._room.send_packet(packet, reliable=reliable)

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
    ) -> TextStreamInfo:
        """Send a whole text as a text stream."""
        return await self._room._streams.send_text(
            text,
            topic=topic,
            destination_identities=destination_identities,
            attributes=attributes,
            reply_to_id=reply_to_id,
            attachments=attachments,
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
        return await self._room._streams.stream_text(
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
    ) -> ByteStreamInfo:
        """Send bytes as a byte stream."""
        return await self._room._streams.send_bytes(
            data,
            name=name,
            mime_type=mime_type,
            topic=topic,
            destination_identities=destination_identities,
            attributes=attributes,
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
        return await self._room._streams.send_file(
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
        return await self._room._streams.stream_bytes(
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
        return await self._room._rpc.perform_rpc(
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
        return self._room._rpc.register_rpc_method(method, handler)

    def unregister_rpc_method(self, method: str) -> None:
        """Stop answering `method` (callers then get UNSUPPORTED_METHOD)."""
        self._room._rpc.unregister_rpc_method(method)

    def set_rpc_fallback_handler(self, fallback: RpcFallbackHandler | None) -> None:
        """Resolve methods without a registered handler through `fallback` (see `RpcManager`)."""
        self._room._rpc.set_fallback_handler(fallback)

    # --- our own state ---

    async def set_attributes(self, attributes: Mapping[str, str]) -> None:
        """Merge `attributes` into ours; an empty value deletes that key.

        Waits for the server's confirmation; a refusal (e.g. the token lacks
        `canUpdateOwnMetadata`, or the size limit) raises `StateUpdateError`.
        """
        await self._room._update_own(attributes=attributes)

    async def set_metadata(self, metadata: str) -> None:
        """Replace our metadata (the server treats an empty string as "unchanged")."""
        await self._room._update_own(metadata=metadata)

    async def set_name(self, name: str) -> None:
        """Replace our display name (the server treats an empty string as "unchanged")."""
        await self._room._update_own(name=name)

    def __repr__(self) -> str:
        return f"LocalParticipant(identity={self.identity!r}, sid={self.sid!r})"
