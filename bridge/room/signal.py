"""LiveKit signalling: the WebSocket to `/rtc` carrying protobuf SignalRequest/SignalResponse.

One `SignalClient` per session. `connect` opens the socket on one of the two join paths, waits
for the first message (JoinResponse, or a `leave` that refuses us) and maps every failure to a
typed `ConnectError`:

* `/rtc/v1` (single peer connection, livekit-server >= 1.9.1): one `join_request` query
  parameter, a base64url `WrappedJoinRequest` around our `JoinRequest` (livekit-protocol.md
  §1.3). A server without that path answers 404, which becomes `SinglePcUnsupportedError` so
  that the caller can fall back to `/rtc`.
* `/rtc` (v0, dual peer connection): the same claims as query parameters (§1.2).

Afterwards `recv` yields server messages, `send` writes requests, and a ping task sends
`ping_req` every `ping_interval` and closes the socket when nothing arrived for `ping_timeout`
(the server itself never drops a silent client).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import platform
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from google.protobuf.message import DecodeError
from livekit.protocol import models, rtc

from bridge import __version__
from bridge.room.errors import (
    AuthError,
    ConnectError,
    InvalidUrlError,
    RoomNotFoundError,
    ServerUnreachableError,
)
from bridge.room.types import Counters

log = logging.getLogger("roombus.room.signal")

# The signalling protocol we speak (server CurrentProtocol; JS and Rust claim 17 too).
PROTOCOL_VERSION = 17
# Server frames are at most 2 MiB by default; leave headroom for a raised server limit.
MAX_SIGNAL_FRAME = 8 * 1024 * 1024
# The text of livekit-server's 404 for a room that does not exist (service/errors.go).
ROOM_MISSING = "requested room does not exist"


class SignalClosedError(Exception):
    """The signalling socket closed (or was found dead); the session must be rejoined."""


class SinglePcUnsupportedError(ConnectError):
    """The server has no `/rtc/v1` (single peer connection) path: it answered 404.

    Not retriable as such: the same join would get the same answer. A caller in "auto" mode
    joins again on `/rtc` (dual peer connection), as the official SDKs do.
    """


@dataclass(frozen=True, slots=True)
class JoinParams:
    """What we claim about ourselves in the join URL."""

    client_protocol: int = 0
    capabilities: Sequence[int] = ()
    auto_subscribe: bool = False
    # Join on `/rtc/v1` (one peer connection for both directions) instead of `/rtc`.
    single_peer_connection: bool = False


def signal_url(url: str, token: str, params: JoinParams) -> str:
    """The join WebSocket URL for `url` (ws, wss, http or https; an optional path prefix).

    `/rtc/v1?access_token=...&join_request=...` when `params.single_peer_connection`, else
    `/rtc?access_token=...&protocol=...` with the v0 query parameters.
    """
    scheme, netloc, prefix = _split(url)
    if params.single_peer_connection:
        wrapped = rtc.WrappedJoinRequest(
            compression=rtc.WrappedJoinRequest.Compression.NONE,
            join_request=join_request(params).SerializeToString(),
        )
        # Go's base64.URLEncoding: the URL-safe alphabet *with* padding.
        encoded = base64.urlsafe_b64encode(wrapped.SerializeToString()).decode("ascii")
        query = urllib.parse.urlencode([("access_token", token), ("join_request", encoded)])
        return urllib.parse.urlunsplit((scheme, netloc, prefix + "/rtc/v1", query, ""))
    return urllib.parse.urlunsplit((scheme, netloc, prefix + "/rtc", _v0_query(token, params), ""))


def join_request(params: JoinParams) -> rtc.JoinRequest:
    """The `JoinRequest` of a v1 join: what the v0 query string says, as a message.

    The v1 server reads nothing else from the URL, and its defaults differ from v0's (there a
    missing `auto_subscribe` means true): every connection setting is set explicitly.
    """
    info = models.ClientInfo(
        sdk=models.ClientInfo.SDK.PYTHON,
        version=__version__,
        protocol=PROTOCOL_VERSION,
        os=platform.system().lower(),
        os_version=platform.release(),
        client_protocol=params.client_protocol,
        capabilities=[models.ClientInfo.Capability.Name(c) for c in params.capabilities],
    )
    settings = rtc.ConnectionSettings(
        auto_subscribe=params.auto_subscribe,
        adaptive_stream=False,
        auto_subscribe_data_track=False,
    )
    return rtc.JoinRequest(client_info=info, connection_settings=settings)


def _split(url: str) -> tuple[str, str, str]:
    """(WebSocket scheme, host[:port], path prefix without a trailing slash) of `url`."""
    parsed = urllib.parse.urlsplit(url)
    scheme = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}.get(parsed.scheme)
    if scheme is None or not parsed.hostname:
        raise InvalidUrlError(
            f"invalid LiveKit URL {url!r}: expected ws://host[:port], wss://, http:// or https://"
        )
    try:
        _ = parsed.port
    except ValueError as exc:
        raise InvalidUrlError(f"invalid LiveKit URL {url!r}: {exc}") from exc
    return scheme, parsed.netloc, parsed.path.rstrip("/")


def _v0_query(token: str, params: JoinParams) -> str:
    query: list[tuple[str, str]] = [
        ("access_token", token),
        ("protocol", str(PROTOCOL_VERSION)),
        ("client_protocol", str(params.client_protocol)),
        ("sdk", "python"),
        ("version", __version__),
        ("os", platform.system().lower()),
        ("os_version", platform.release()),
        ("auto_subscribe", "1" if params.auto_subscribe else "0"),
    ]
    if params.capabilities:
        names = [models.ClientInfo.Capability.Name(c) for c in params.capabilities]
        query.append(("capabilities", ",".join(names)))
    return urllib.parse.urlencode(query)


def _redact(url: str) -> str:
    """The URL without its token, for messages and logs."""
    parsed = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path, "", ""))


class SignalClient:
    """One signalling WebSocket session."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self._last_received = time.monotonic()
        self._rtt_ms = 0
        self._closed_reason: str | None = None

    @property
    def rtt_ms(self) -> int:
        """The last measured signalling round trip, in milliseconds (0 before the first pong)."""
        return self._rtt_ms

    async def connect(
        self, url: str, token: str, params: JoinParams, *, join_timeout: float = 10.0
    ) -> rtc.JoinResponse:
        """Open the socket and return the JoinResponse; raise a `ConnectError` otherwise."""
        ws_url = signal_url(url, token, params)
        where = _redact(ws_url)
        self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(join_timeout):
                try:
                    self._ws = await self._session.ws_connect(
                        ws_url, max_msg_size=MAX_SIGNAL_FRAME, autoping=True, heartbeat=None
                    )
                except aiohttp.WSServerHandshakeError as exc:
                    reason = await self._validate_reason(ws_url)
                    if (
                        params.single_peer_connection
                        and exc.status == 404
                        and ROOM_MISSING not in reason
                    ):
                        # A server older than 1.9.1: no such route (Go's "404 page not
                        # found"). The room-missing 404 says so (the JS SDK tells them apart
                        # the same way).
                        raise SinglePcUnsupportedError(
                            f"signal: {where} answered HTTP 404"
                            + (f" ({reason})" if reason else "")
                            + ": the server has no single peer connection mode "
                            "(livekit-server < 1.9.1)"
                        ) from exc
                    raise _handshake_error(where, exc.status, reason) from exc
                except aiohttp.ClientConnectorError as exc:
                    raise ServerUnreachableError(
                        f"signal: connect to {where} failed: {exc.os_error or exc}"
                    ) from exc
                except aiohttp.ClientError as exc:
                    raise ServerUnreachableError(
                        f"signal: connect to {where} failed: {exc}"
                    ) from exc
                first = await self._recv_message()
        except TimeoutError as exc:
            await self.close()
            raise ServerUnreachableError(
                f"signal: connect to {where} failed: no join response within {join_timeout:.0f} s"
            ) from exc
        except SignalClosedError as exc:
            await self.close()
            raise ServerUnreachableError(
                f"signal: connect to {where} failed: socket closed before the join response"
            ) from exc
        except BaseException:
            await self.close()
            raise
        kind = first.WhichOneof("message")
        if kind == "join":
            return first.join
        await self.close()
        if kind == "leave":
            reason = models.DisconnectReason.Name(first.leave.reason)
            raise ConnectError(f"signal: join {where} refused by the server: {reason}")
        raise ConnectError(f"signal: join {where} failed: unexpected first message {kind!r}")

    async def _validate_reason(self, ws_url: str) -> str:
        """Ask `/rtc/validate` why the upgrade failed (the server answers in plain text)."""
        parsed = urllib.parse.urlsplit(ws_url)
        scheme = "https" if parsed.scheme == "wss" else "http"
        url = urllib.parse.urlunsplit(
            (scheme, parsed.netloc, parsed.path + "/validate", parsed.query, "")
        )
        assert self._session is not None
        try:
            async with (
                asyncio.timeout(3),
                self._session.get(url) as resp,
            ):
                return (await resp.text()).strip()[:300]
        except (aiohttp.ClientError, TimeoutError):
            return ""

    def start_pings(self, interval: float, dead_after: float) -> None:
        """Start the keep-alive: `ping_req` every `interval` s, dead after `dead_after` s silent."""
        self._last_received = time.monotonic()
        self._ping_task = asyncio.create_task(self._ping_loop(interval, dead_after), name="lk-ping")

    async def _ping_loop(self, interval: float, dead_after: float) -> None:
        while True:
            await asyncio.sleep(interval)
            silent = time.monotonic() - self._last_received
            if silent > dead_after:
                log.warning(
                    "signal: no message for %.1f s (limit %.0f s): reconnecting", silent, dead_after
                )
                self._closed_reason = f"ping timeout ({silent:.1f} s without a message)"
                if self._ws is not None:
                    await self._ws.close()
                return
            now_ms = int(time.time() * 1000)
            req = rtc.SignalRequest(ping_req=rtc.Ping(timestamp=now_ms, rtt=self._rtt_ms))
            with contextlib.suppress(SignalClosedError):
                await self.send(req)

    async def send(self, request: rtc.SignalRequest) -> None:
        """Write one request; raises `SignalClosedError` when the socket is gone."""
        ws = self._ws
        if ws is None or ws.closed:
            raise SignalClosedError(self._closed_reason or "signal socket is closed")
        try:
            await ws.send_bytes(request.SerializeToString())
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise SignalClosedError(f"send failed: {exc}") from exc

    async def recv(self) -> rtc.SignalResponse:
        """The next server message (pongs are consumed here); raises `SignalClosedError`."""
        while True:
            msg = await self._recv_message()
            kind = msg.WhichOneof("message")
            if kind == "pong_resp":
                now_ms = int(time.time() * 1000)
                self._rtt_ms = max(0, now_ms - msg.pong_resp.last_ping_timestamp)
                continue
            if kind == "pong":
                continue
            return msg

    async def _recv_message(self) -> rtc.SignalResponse:
        ws = self._ws
        if ws is None:
            raise SignalClosedError("not connected")
        while True:
            frame = await ws.receive()
            if frame.type == aiohttp.WSMsgType.BINARY:
                self._last_received = time.monotonic()
                msg = rtc.SignalResponse()
                try:
                    msg.ParseFromString(frame.data)
                except DecodeError as exc:
                    self._counters.inc("signal.malformed")
                    log.warning(
                        "signal: dropped a malformed frame (%d bytes): %s", len(frame.data), exc
                    )
                    continue
                if msg.WhichOneof("message") is None:
                    # A message kind newer than our protobuf stubs: unknown fields only.
                    self._counters.inc("signal.unknown_message")
                    log.debug("signal: ignored a message of an unknown kind")
                    continue
                return msg
            if frame.type == aiohttp.WSMsgType.TEXT:
                self._last_received = time.monotonic()
                self._counters.inc("signal.unexpected_text")
                log.warning("signal: ignored a text frame (we speak binary protobuf)")
                continue
            if frame.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            ):
                raise SignalClosedError(
                    self._closed_reason or f"socket closed (code {ws.close_code})"
                )
            if frame.type == aiohttp.WSMsgType.ERROR:
                raise SignalClosedError(f"socket error: {ws.exception()}")

    async def close(self) -> None:
        """Close the socket and the HTTP session (idempotent)."""
        if self._ping_task is not None:
            self._ping_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ping_task
            self._ping_task = None
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
            self._ws = None
        if self._session is not None:
            await self._session.close()
            self._session = None


def _handshake_error(where: str, status: int, reason: str) -> ConnectError:
    why = f"HTTP {status}" + (f": {reason}" if reason else "")
    if status in (401, 403):
        return AuthError(f"signal: join {where} rejected: {why} (check the token and its grants)")
    if status == 404:
        return RoomNotFoundError(f"signal: join {where} failed: {why}")
    if status in (502, 503, 504):
        return ServerUnreachableError(f"signal: join {where} failed: {why}")
    return ConnectError(f"signal: join {where} failed: {why}")
