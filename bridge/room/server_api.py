"""LiveKit server side: join tokens and the RoomService API (Twirp over HTTP), on `livekit-api`.

`mint_token` signs participant tokens (HS256, API key as issuer). `ServerApi` calls
`livekit.RoomService` methods: rooms, room metadata, participants, server-sent data and
server-initiated RPC. Every third-party error is wrapped here into the `bridge.room.errors` tree,
with messages like ``server_api: DeleteRoom room=lobby failed: room not found (HTTP 404: ...)``:

* HTTP 401 / ``unauthenticated`` / ``permission_denied`` ⇒ `AuthError`
* ``not_found`` (room) ⇒ `RoomNotFoundError`; a missing participant ⇒ `RoomError`
* connection refused, reset or timed out ⇒ `ServerUnreachableError` (retriable)
* a size limit (``... exceeds limits ...``) on a state update ⇒ `StateUpdateError`
* PerformRpc failures ⇒ `RpcError` with the code, message and data the callee (or the server)
  produced.

livekit-api's `RoomService` has no PerformRpc (livekit-api 1.2.2), and its methods take no
per-call timeout, which PerformRpc needs (the server waits up to the response timeout). So every
call goes through livekit-api's `TwirpClient` directly, with the grants `RoomService` would use.
Region failover (a LiveKit Cloud feature that replays requests) is off: one attempt per call.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from google.protobuf.message import DecodeError, Message
from livekit import api
from livekit.api.twirp_client import TwirpClient
from livekit.protocol import models
from livekit.protocol import room as room_pb

from bridge.room.errors import (
    AuthError,
    DataPacketTooLargeError,
    InvalidUrlError,
    RoomError,
    RoomNotFoundError,
    RpcError,
    ServerUnreachableError,
    StateUpdateError,
)
from bridge.room.types import MAX_DATA_PACKET_BYTES

logger = logging.getLogger("roombus.room.server_api")

_T = TypeVar("_T", bound=Message)

_SERVICE: Final = "RoomService"
# Participant kinds a token may claim (the JWT `kind` claim is the lower-case enum name).
TOKEN_KINDS: Final = frozenset(
    {"standard", "ingress", "egress", "sip", "agent", "connector", "bridge"}
)
# Lifetime of the tokens that authorise our own API calls (signed afresh for every call).
_API_TOKEN_TTL: Final = timedelta(minutes=10)
# Extra time the HTTP request of PerformRpc gets beyond the RPC response timeout: the server
# answers "Response timeout" (1502) itself when the callee is late, and we want to receive that.
_RPC_HTTP_MARGIN: Final = 5.0
# Server-side RPC errors arrive as Twirp messages like
# "twirp error unknown: RpcError 4001: message: data" (protocol utils/data_channel_rpc.go).
_RPC_ERROR_RE: Final = re.compile(r"RpcError (\d+): (.*)", re.DOTALL)
# What the pinned server says when no node hosts the room or participant a call is routed to.
_NO_RESPONSE: Final = "no response from servers"


def mint_token(
    api_key: str,
    api_secret: str,
    *,
    identity: str,
    room: str,
    name: str | None = None,
    ttl: timedelta = timedelta(hours=6),
    metadata: str | None = None,
    attributes: Mapping[str, str] | None = None,
    can_update_own_metadata: bool = True,
    can_publish_data: bool = True,
    can_subscribe: bool = True,
    can_publish: bool = False,
    hidden: bool = False,
    kind: str | None = None,
) -> str:
    """A participant join token for `room`, signed with the API secret.

    Args:
        api_key: the API key (the token's issuer).
        api_secret: the secret the server knows for `api_key`.
        identity: the participant identity (JWT `sub`).
        room: the room the token may join.
        name: the display name claim.
        ttl: how long the token is valid; the server allows one extra minute of leeway.
        metadata: the initial participant metadata.
        attributes: the initial participant attributes.
        can_update_own_metadata: grant to change our own name, metadata and attributes.
        can_publish_data: grant to send data packets, streams and RPC.
        can_subscribe: grant to receive (also makes the server's subscriber PC primary).
        can_publish: grant to publish audio and video tracks (LiveKit's default is True).
        hidden: the participant is invisible to others.
        kind: the participant kind claim, one of `TOKEN_KINDS`.

    Returns:
        The signed JWT.

    Raises:
        ValueError: an empty identity, room, key or secret, a non-positive ttl, or an
            unknown kind.
    """
    if not api_key or not api_secret:
        raise ValueError("mint_token: api_key and api_secret must not be empty")
    if not identity or not room:
        raise ValueError("mint_token: identity and room must not be empty")
    if ttl <= timedelta(0):
        raise ValueError(f"mint_token: ttl must be positive, got {ttl}")
    if kind is not None and kind not in TOKEN_KINDS:
        raise ValueError(
            f"mint_token: unknown participant kind {kind!r} "
            f"(known: {', '.join(sorted(TOKEN_KINDS))})"
        )
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_subscribe=can_subscribe,
        can_publish=can_publish,
        can_publish_data=can_publish_data,
        can_update_own_metadata=can_update_own_metadata,
        hidden=hidden or None,
    )
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_ttl(ttl)
        .with_grants(grants)
    )
    if name is not None:
        token.with_name(name)
    if metadata is not None:
        token.with_metadata(metadata)
    if attributes:
        token.with_attributes(dict(attributes))
    if kind is not None:
        # livekit-api types `kind` as a Literal without "connector"/"bridge", which the
        # server accepts; the value was checked above.
        kind_claim: Any = kind
        token.with_kind(kind_claim)
    jwt: str = token.to_jwt()
    return jwt


def http_url(url: str) -> str:
    """The HTTP(S) base URL of the server API for a LiveKit URL.

    ``ws://h:p`` becomes ``http://h:p`` and ``wss://`` becomes ``https://``; ``http(s)`` URLs are
    kept. A path (a reverse-proxy prefix) is kept without its trailing slash.

    Raises:
        InvalidUrlError: another scheme, no host, a bad port, or a query or fragment.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # parses (and so validates) the port
    except ValueError as exc:
        raise InvalidUrlError(f"server_api: invalid LiveKit URL {url!r}: {exc}") from exc
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(
        parts.scheme.lower()
    )
    if scheme is None:
        raise InvalidUrlError(
            f"server_api: invalid LiveKit URL {url!r}: scheme must be ws, wss, http or https"
        )
    if not parts.hostname:
        raise InvalidUrlError(f"server_api: invalid LiveKit URL {url!r}: no host")
    if parts.query or parts.fragment:
        raise InvalidUrlError(
            f"server_api: invalid LiveKit URL {url!r}: must not carry a query or fragment"
        )
    del port
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


class ServerApi:
    """Client of LiveKit's RoomService; an async context manager owning its HTTP session.

    Example::

        async with ServerApi("ws://localhost:7880", key, secret) as server:
            await server.send_data("lobby", b"hello", topic="news")
    """

    def __init__(self, url: str, api_key: str, api_secret: str, *, timeout: float = 10.0) -> None:
        """Prepare a client; no connection is made until the first call.

        Args:
            url: the LiveKit URL (ws, wss, http or https).
            api_key: API key.
            api_secret: API secret.
            timeout: seconds a call may take (PerformRpc gets its response timeout on top).

        Raises:
            InvalidUrlError: `url` is not a LiveKit URL.
            ValueError: an empty key or secret, or a non-positive timeout.
        """
        if not api_key or not api_secret:
            raise ValueError("server_api: api_key and api_secret must not be empty")
        if timeout <= 0:
            raise ValueError(f"server_api: timeout must be positive, got {timeout}")
        self._url = http_url(url)
        self._api_key = api_key
        self._api_secret = api_secret
        self._timeout = timeout
        # Created on first use, inside the event loop (aiohttp wants a running loop).
        self._session: aiohttp.ClientSession | None = None
        self._client: TwirpClient | None = None
        self._closed = False

    @property
    def url(self) -> str:
        """The HTTP(S) base URL the calls go to."""
        return self._url

    async def __aenter__(self) -> ServerApi:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session; later calls raise `RoomError`. Idempotent."""
        self._closed = True
        session, self._session, self._client = self._session, None, None
        if session is not None:
            await session.close()

    # ----------------------------------------------------------------------------- rooms

    async def create_room(
        self, name: str, *, metadata: str | None = None, empty_timeout: int | None = None
    ) -> models.Room:
        """Create room `name` (or return it unchanged if it exists).

        Args:
            name: the room name.
            metadata: the initial room metadata.
            empty_timeout: seconds the room stays open while empty; None for the server default.
        """
        request = room_pb.CreateRoomRequest(
            name=name, metadata=metadata or "", empty_timeout=empty_timeout or 0
        )
        return await self._call(
            "CreateRoom", name, request, models.Room, api.VideoGrants(room_create=True)
        )

    async def list_rooms(self, names: Sequence[str] = ()) -> list[models.Room]:
        """The active rooms, or those of `names` that are active."""
        response = await self._call(
            "ListRooms",
            ",".join(names) or "*",
            room_pb.ListRoomsRequest(names=list(names)),
            room_pb.ListRoomsResponse,
            api.VideoGrants(room_list=True),
        )
        return list(response.rooms)

    async def delete_room(self, name: str) -> None:
        """Delete room `name`, disconnecting everyone in it.

        Raises:
            RoomNotFoundError: no such room.
        """
        await self._call(
            "DeleteRoom",
            name,
            room_pb.DeleteRoomRequest(room=name),
            room_pb.DeleteRoomResponse,
            api.VideoGrants(room_create=True),
        )

    async def update_room_metadata(self, room: str, metadata: str) -> models.Room:
        """Replace the room's metadata (participants get a `room_update`).

        Raises:
            RoomNotFoundError: no such room.
            StateUpdateError: the metadata is over the server's size limit.
        """
        return await self._call(
            "UpdateRoomMetadata",
            room,
            room_pb.UpdateRoomMetadataRequest(room=room, metadata=metadata),
            models.Room,
            self._admin(room),
        )

    # ----------------------------------------------------------------------------- participants

    async def list_participants(self, room: str) -> list[models.ParticipantInfo]:
        """The participants of `room` (the pinned server answers [] for a missing room)."""
        response = await self._call(
            "ListParticipants",
            room,
            room_pb.ListParticipantsRequest(room=room),
            room_pb.ListParticipantsResponse,
            self._admin(room),
        )
        return list(response.participants)

    async def update_participant(
        self,
        room: str,
        identity: str,
        *,
        attributes: Mapping[str, str] | None = None,
        metadata: str | None = None,
        name: str | None = None,
    ) -> models.ParticipantInfo:
        """Change another participant's attributes, metadata or name.

        Attributes are merged key by key and a key set to ``""`` is deleted. Empty `metadata` or
        `name` leaves them unchanged: the server cannot clear them.

        Raises:
            RoomError: no such participant in the room.
            StateUpdateError: over the server's name/metadata/attribute size limits.
        """
        request = room_pb.UpdateParticipantRequest(
            room=room,
            identity=identity,
            attributes=dict(attributes or {}),
            metadata=metadata or "",
            name=name or "",
        )
        return await self._call(
            "UpdateParticipant",
            room,
            request,
            models.ParticipantInfo,
            self._admin(room),
            identity=identity,
        )

    # ----------------------------------------------------------------------------- data and RPC

    async def send_data(
        self,
        room: str,
        data: bytes,
        *,
        topic: str | None = None,
        destination_identities: Sequence[str] = (),
        reliable: bool = True,
    ) -> None:
        """Send a data packet to the room (or to `destination_identities` only).

        Receivers see it with an empty sender identity.

        Raises:
            DataPacketTooLargeError: the packet would exceed the data channel limit.
            RoomNotFoundError: the room is not active on the server.
        """
        destinations = list(destination_identities)
        # The server forwards the payload as a DataPacket on the receivers' data channels, where
        # anything above the channel limit is lost; refuse it here instead.
        size = models.DataPacket(
            user=models.UserPacket(
                payload=data,
                topic=topic,
                destination_identities=destinations,
                nonce=bytes(16),
            ),
            destination_identities=destinations,
        ).ByteSize()
        if size > MAX_DATA_PACKET_BYTES:
            raise DataPacketTooLargeError(
                size, MAX_DATA_PACKET_BYTES, "server_api: SendData packet"
            )
        kind = models.DataPacket.Kind.RELIABLE if reliable else models.DataPacket.Kind.LOSSY
        request = room_pb.SendDataRequest(
            room=room,
            data=data,
            kind=kind,
            destination_identities=destinations,
            topic=topic,
            # The server deduplicates by nonce; livekit-api's RoomService sends one too.
            nonce=uuid.uuid4().bytes,
        )
        await self._call("SendData", room, request, room_pb.SendDataResponse, self._admin(room))

    async def perform_rpc(
        self,
        room: str,
        destination_identity: str,
        method: str,
        payload: str,
        *,
        response_timeout: float = 10.0,
    ) -> str:
        """Call RPC `method` on participant `destination_identity`, as the server.

        Args:
            room: the room.
            destination_identity: the participant whose handler runs.
            method: the registered method name.
            payload: the request payload (at most 15,360 UTF-8 bytes).
            response_timeout: seconds the callee has to answer.

        Returns:
            The handler's response payload.

        Raises:
            RpcError: the handler raised (its code, message and data), or a built-in failure:
                1400 unsupported method, 1401 recipient not found, 1402 payload too large,
                1501/1502 timeouts, ...
        """
        if not destination_identity:
            raise ValueError("server_api: perform_rpc needs a destination identity")
        if response_timeout <= 0:
            raise ValueError(f"server_api: response_timeout must be positive: {response_timeout}")
        request = room_pb.PerformRpcRequest(
            room=room,
            destination_identity=destination_identity,
            method=method,
            payload=payload,
            response_timeout_ms=max(1, round(response_timeout * 1000)),
        )
        response = await self._call(
            "PerformRpc",
            room,
            request,
            room_pb.PerformRpcResponse,
            self._admin(room),
            identity=destination_identity,
            seconds=max(self._timeout, response_timeout + _RPC_HTTP_MARGIN),
        )
        return response.payload

    # ----------------------------------------------------------------------------- internals

    @staticmethod
    def _admin(room: str) -> api.VideoGrants:
        return api.VideoGrants(room_admin=True, room=room)

    def _twirp(self) -> TwirpClient:
        if self._closed:
            raise RoomError("server_api: client is closed")
        if self._client is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
            self._client = TwirpClient(self._session, self._url, "livekit", failover=False)
        return self._client

    def _auth(self, grants: api.VideoGrants) -> dict[str, str]:
        token = (
            api.AccessToken(self._api_key, self._api_secret)
            .with_ttl(_API_TOKEN_TTL)
            .with_grants(grants)
            .to_jwt()
        )
        return {"Authorization": f"Bearer {token}"}

    async def _call(
        self,
        method: str,
        room: str,
        request: Message,
        response_class: type[_T],
        grants: api.VideoGrants,
        *,
        identity: str | None = None,
        seconds: float | None = None,
    ) -> _T:
        client = self._twirp()
        total = seconds if seconds is not None else self._timeout
        logger.debug("server_api: %s room=%s", method, room)
        try:
            # asyncio.timeout backs up aiohttp's own timeout, which does not cover every phase.
            async with asyncio.timeout(total + 1.0):
                return await client.request(
                    _SERVICE,
                    method,
                    request,
                    self._auth(grants),
                    response_class,
                    timeout=aiohttp.ClientTimeout(total=total),
                )
        except api.ServerError as exc:
            raise _server_error(method, room, identity, exc) from exc
        except TimeoutError as exc:
            raise ServerUnreachableError(
                f"server_api: {method} room={room} failed: no answer from {self._url} "
                f"within {total:g} s"
            ) from exc
        except aiohttp.ClientConnectionError as exc:
            raise ServerUnreachableError(
                f"server_api: {method} room={room} failed: cannot reach {self._url}: {exc}"
            ) from exc
        except (aiohttp.ClientError, DecodeError) as exc:
            raise RoomError(
                f"server_api: {method} room={room} failed: bad response from {self._url}: {exc}"
            ) from exc


def _server_error(method: str, room: str, identity: str | None, exc: api.ServerError) -> RoomError:
    """The `bridge.room.errors` error for a Twirp error answer."""
    detail = exc.message.removeprefix("twirp error unknown: ")
    where = f"server_api: {method} room={room} failed"
    status = f"HTTP {exc.status} {exc.code}" + (f": {detail}" if detail else "")
    code = exc.code

    if method == "PerformRpc":
        match = _RPC_ERROR_RE.search(detail)
        if match is not None:
            return _rpc_error(int(match.group(1)), match.group(2))
        if code == "unavailable" and _NO_RESPONSE in detail:
            # No server node handles this room/participant: the callee is not in the room.
            return RpcError.builtin(RpcError.RECIPIENT_NOT_FOUND, f"{identity} in {room}")

    if exc.status == 401 or code == "unauthenticated":
        return AuthError(f"{where}: API key or secret rejected ({status})")
    if exc.status == 403 or code == "permission_denied":
        return AuthError(f"{where}: permission denied ({status})")
    if code == "not_found" or exc.status == 404:
        if "participant" in detail:
            return RoomError(f"{where}: participant {identity!r} not found ({status})")
        return RoomNotFoundError(f"{where}: room not found ({status})")
    if code == "unavailable" and _NO_RESPONSE in detail:
        return RoomNotFoundError(f"{where}: room not active on any server node ({status})")
    if code == "invalid_argument" and "exceeds" in detail:
        return StateUpdateError(f"{where}: over a server limit ({status})", reason="LIMIT_EXCEEDED")
    error = RoomError(f"{where}: {status}")
    error.retriable = exc.status >= 500
    return error


def _rpc_error(code: int, text: str) -> RpcError:
    """An RpcError from the server's "<message>: <data>" text (data optional).

    The server joins message and data with ": ", so the split is ambiguous when the message
    itself contains ": "; built-in messages are matched exactly, otherwise the first ": " splits.
    """
    builtin = RpcError.BUILTIN_MESSAGES.get(code)
    if builtin is not None and (text == builtin or text.startswith(builtin + ": ")):
        data = text[len(builtin) + 2 :] or None
        return RpcError(code, builtin, data)
    message, sep, data = text.partition(": ")
    return RpcError(code, message, data if sep else None)
