"""`Room`: our LiveKit participant — one connection to one room, kept up until closed.

A *session* is one signalling socket plus its peer connections: one in LiveKit's single peer
connection mode (`/rtc/v1`, our offer, both directions on its `_reliable` and `_lossy`
channels), two in the dual mode (`/rtc`: a publisher connection we offer for upstream data, a
subscriber connection the server offers for downstream data). `RoomOptions.single_peer_connection`
picks the mode; "auto" (the default) tries single and falls back to dual when the server has no
`/rtc/v1` (HTTP 404: livekit-server < 1.9.1), as the official SDKs do. One connection instead
of two halves the ICE agents, whose connectivity and consent checks are most of what an idle
room costs.

`Room.connect` opens the first session; when a session is lost (socket closed, pings
unanswered, a peer connection failed, or the server asks us to leave and come back) the
supervisor opens a new one with jittered exponential backoff — aiortc cannot ICE-restart, so
every recovery is a full rejoin with a new sid, in either mode. Pending RPCs fail and open
streams abort at that moment; after the rejoin the participant state is diffed against what we
held, so subscribers see what changed during the outage.

Inbound data takes three bounded paths, each drained in order by its own task: user packets and
state changes go to the event hub (`Room.on`, `Room.events`), stream packets to the
`StreamManager`, RPC packets to the `RpcManager`. The aiortc callbacks only classify and enqueue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal, TypeVar

import tenacity
from aiortc import RTCConfiguration, RTCDataChannel
from livekit.protocol import models, rtc

from bridge.room.data_tracks import DATA_TRACK_LABEL, DataTrackManager
from bridge.room.datachannel import FlowControlledChannel
from bridge.room.delivery import Delivery
from bridge.room.e2ee import DataCryptor, DecryptError
from bridge.room.errors import (
    ConnectError,
    NotConnectedError,
    RpcError,
    ServerUnreachableError,
    StateUpdateError,
)
from bridge.room.events import (
    DataReceived,
    Disconnected,
    EventHub,
    Reconnected,
    Reconnecting,
    Subscription,
)
from bridge.room.packets import ReceiveDeduper, decode, encode, received_user_packet
from bridge.room.participant import LocalParticipant, RemoteParticipant
from bridge.room.rpc import RpcFallbackHandler, RpcManager
from bridge.room.signal import (
    JoinParams,
    SignalClient,
    SignalClosedError,
    SinglePcUnsupportedError,
)
from bridge.room.state import ParticipantDisconnected, RoomState
from bridge.room.streams import ByteStreamHandler, StreamManager, TextStreamHandler
from bridge.room.tasks import spawn
from bridge.room.transport import PeerTransport, ice_configuration
from bridge.room.types import (
    CLIENT_PROTOCOL_DATA_STREAM_V2,
    Counters,
    DataPacketKind,
)

log = logging.getLogger("roombus.room")

E = TypeVar("E")

_STREAM_KINDS = frozenset({"stream_header", "stream_chunk", "stream_trailer"})
_RPC_KINDS = frozenset({"rpc_request", "rpc_ack", "rpc_response"})
_RPC_REPLIES = frozenset({"rpc_ack", "rpc_response"})
# Seconds to wait for a lost session's peer connections to close before rejoining anyway,
# and for any still closing when the room itself closes.
CLOSE_GRACE = 2.0
FINAL_CLOSE_GRACE = 5.0


@dataclass
class RoomOptions:
    """How the participant connects and recovers."""

    # Subscribe to media tracks: never needed for data, and aiortc + media re-offers are fragile.
    auto_subscribe: bool = False
    # One peer connection for both directions (`/rtc/v1`), two (`/rtc`), or "auto": single,
    # and dual when the server answers 404 on `/rtc/v1` (remembered for the rejoins).
    single_peer_connection: bool | Literal["auto"] = "auto"
    # Signalling socket up and JoinResponse received within this many seconds.
    join_timeout: float = 10.0
    # Both peer connections and data channels up within this many seconds after joining.
    webrtc_timeout: float = 15.0
    # Rejoin after a lost session; None attempts means until `disconnect()`.
    reconnect: bool = True
    reconnect_max_attempts: int | None = None
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    # ICE servers to use instead of the ones the server sends (None: the server's).
    ice_servers: Sequence[rtc.ICEServer] | None = None
    # CA certificates (a PEM file) trusted besides the system's for `turns:` servers; None:
    # `$ROOMBUS_TURN_CA_FILE`, if set.
    turn_ca_file: str | None = None
    # Bounds of the inbound paths (events, stream packets, RPC packets), in items.
    event_queue_size: int = 10_000
    stream_queue_size: int = 4_096
    rpc_queue_size: int = 4_096
    # Seconds to wait for the server to confirm a change of our own name/metadata/attributes.
    state_update_timeout: float = 10.0
    # What we tell peers we implement (see livekit-protocol.md §1.4).
    client_protocol: int = CLIENT_PROTOCOL_DATA_STREAM_V2
    capabilities: Sequence[int] = field(
        default_factory=lambda: [models.ClientInfo.Capability.CAP_COMPRESSION_DEFLATE_RAW]
    )
    # The room's E2EE shared key (`bridge.room.e2ee`): packets and streams we send are
    # encrypted, encrypted ones we receive decrypted. None: encrypted packets are rejected
    # (counted `rejected.encrypted`), ours go out in the clear.
    e2ee: DataCryptor | None = None


class _Session:
    """One signalling socket and its peer connections (one or two, see the module docstring)."""

    def __init__(
        self,
        join: rtc.JoinResponse,
        signal: SignalClient,
        config: RTCConfiguration,
        *,
        single_pc: bool,
    ):
        self.join = join
        self.signal = signal
        self.config = config
        self.single_pc = single_pc
        # `publisher`: the connection we offer, with our `_reliable` and `_lossy` (upstream
        # data). `subscriber`: the one downstream data arrives on. In single peer connection
        # mode they are the same transport.
        self.subscriber: PeerTransport | None = None
        self.publisher: PeerTransport | None = None
        self.reliable: FlowControlledChannel | None = None
        self.lossy: FlowControlledChannel | None = None
        # Our `_data_track` channel (upstream data-track packets; downstream too in single mode).
        self.data_track: RTCDataChannel | None = None
        self.channels_open = asyncio.Event()
        # The `_reliable` channel downstream data arrives on (and server-initiated RPC,
        # refused with "data channel is not available" until it is open): the server's on the
        # subscriber connection in dual mode, our own in single mode.
        self.downstream_open = asyncio.Event()
        self.next_seq = 1
        self.offer_id = 0
        self.lost = False
        self.reader: asyncio.Task[None] | None = None
        # The DisconnectReason of the server's `leave`, if it sent one (see `Disconnected`).
        self.leave_reason: int | None = None


class Room:
    """A LiveKit room, joined as a participant.

    Use::

        room = Room()
        room.register_text_stream_handler("chat", on_chat)
        async with room:
            await room.connect(url, token)
            async for event in room.events(DataReceived):
                ...
    """

    def __init__(self, options: RoomOptions | None = None) -> None:
        self.options = options or RoomOptions()
        self.counters = Counters()
        self._state = RoomState(counters=self.counters)
        self._hub = EventHub()
        self._streams = StreamManager(self)
        self._rpc = RpcManager(self, self._streams)
        self._data_tracks = DataTrackManager(
            self.counters,
            send_signal=self._send_signal_soon,
            post_event=self._post_event,
            remote_tracks=self._remote_data_tracks,
            request_timeout=lambda: self.options.state_update_timeout,
            e2ee=self.options.e2ee,
        )
        self.local_participant = LocalParticipant(
            info=lambda: self._state.local,
            send_packet=self.send_packet,
            send_packet_tracked=self.send_packet_tracked,
            update_own=self._update_own,
            streams=self._streams,
            rpc=self._rpc,
            data_tracks=self._data_tracks,
        )
        self._deduper = ReceiveDeduper()
        self._e2ee = self.options.e2ee
        self._encrypted_rejected_logged = False
        self._session: _Session | None = None
        # "auto" found the server without `/rtc/v1`: its rejoins go to `/rtc` straight away.
        self._single_pc_unsupported = False
        self._url = ""
        self._token = ""
        self._renew_token: Callable[[], str] | None = None
        self._connection_state = "disconnected"
        self._lost: asyncio.Queue[tuple[_Session, str, bool]] = asyncio.Queue()
        self._event_inbox: asyncio.Queue[object] = asyncio.Queue(self.options.event_queue_size)
        self._stream_inbox: asyncio.Queue[models.DataPacket] = asyncio.Queue(
            self.options.stream_queue_size
        )
        self._rpc_inbox: asyncio.Queue[models.DataPacket] = asyncio.Queue(
            self.options.rpc_queue_size
        )
        self._pending_updates: dict[int, asyncio.Future[rtc.RequestResponse]] = {}
        # Ids of open lk.rpc_* streams, routed with RPC packets (insertion-ordered, bounded).
        self._protocol_streams: dict[str, None] = {}
        self._next_request_id = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self._closers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = asyncio.Event()

    # ------------------------------------------------------------------ public

    @property
    def connection_state(self) -> str:
        """``disconnected``, ``connecting``, ``connected`` or ``reconnecting``."""
        return self._connection_state

    @property
    def isconnected(self) -> bool:
        """Whether a session is up (sends can go out)."""
        return self._connection_state == "connected"

    @property
    def single_peer_connection(self) -> bool | None:
        """Whether the current session runs on one peer connection (None: no session)."""
        session = self._session
        return None if session is None else session.single_pc

    @property
    def name(self) -> str:
        """The room's name."""
        return self._state.room.name

    @property
    def sid(self) -> str:
        """The room's sid."""
        return self._state.room.sid

    @property
    def metadata(self) -> str:
        """The room's metadata (set through the server API)."""
        return self._state.room.metadata

    @property
    def created_at_ms(self) -> int:
        """When the server created the room (epoch ms), 0 if it did not say."""
        room = self._state.room
        return room.creation_time_ms or room.creation_time * 1000

    @property
    def remote_participants(self) -> dict[str, RemoteParticipant]:
        """Everyone else in the room, by identity (snapshots)."""
        return {
            identity: RemoteParticipant.from_info(info)
            for identity, info in self._state.remote_participants.items()
        }

    def on(
        self, event_type: type[E], handler: Callable[[E], Awaitable[None] | None]
    ) -> Callable[[], None]:
        """Call `handler` for each event of `event_type`, in order; returns an unsubscriber."""
        return self._hub.on(event_type, handler)

    def events(self, *types: type[Any], maxsize: int = 1024) -> Subscription:
        """An async iterator over events of `types` (all when none), ending when the room closes."""
        return self._hub.subscribe(types, maxsize)

    @property
    def remote_data_tracks(self) -> dict[str, list[str]]:
        """The data tracks others publish: track names by publisher identity."""
        found: dict[str, list[str]] = {}
        for identity, _sid, info in self._remote_data_tracks():
            found.setdefault(identity, []).append(info.name)
        return found

    def subscribe_data_track(self, publisher_identity: str, track_name: str) -> None:
        """Receive `DataTrackFrameReceived` events for that data track.

        Takes effect now if the track is published, else once it is, and again after every
        rejoin, until `unsubscribe_data_track` (data tracks are never subscribed otherwise).
        """
        self._data_tracks.subscribe(publisher_identity, track_name)

    def subscribe_data_tracks(self, match: Callable[[str, str], bool]) -> Callable[[], None]:
        """Receive the frames of every data track for which `match(identity, name)` is true.

        As `subscribe_data_track`: tracks published now or later, again after every rejoin.
        Returns a function that forgets `match` (what it subscribed stays subscribed).
        """
        return self._data_tracks.subscribe_matching(match)

    def unsubscribe_data_track(self, publisher_identity: str, track_name: str) -> None:
        """Stop receiving that data track's frames."""
        self._data_tracks.unsubscribe(publisher_identity, track_name)

    def _remote_data_tracks(self) -> list[tuple[str, str, models.DataTrackInfo]]:
        return [
            (identity, info.sid, track)
            for identity, info in self._state.remote_participants.items()
            for track in info.data_tracks
        ]

    def _send_signal_soon(self, request: rtc.SignalRequest) -> asyncio.Future[None]:
        """Send `request` on the current session's socket (raises `NotConnectedError`)."""
        session = self._require_session()

        async def send() -> None:
            try:
                await session.signal.send(request)
            except SignalClosedError as exc:
                raise NotConnectedError(f"room: signal request not sent: {exc}") from exc

        return asyncio.ensure_future(send())

    def register_text_stream_handler(self, topic: str, handler: TextStreamHandler) -> None:
        """Handle incoming text streams of `topic`; register before data arrives."""
        self._streams.register_text_stream_handler(topic, handler)

    def unregister_text_stream_handler(self, topic: str) -> None:
        """Stop handling text streams of `topic` (they are then dropped)."""
        self._streams.unregister_text_stream_handler(topic)

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        """Handle incoming byte streams of `topic`; register before data arrives."""
        self._streams.register_byte_stream_handler(topic, handler)

    def unregister_byte_stream_handler(self, topic: str) -> None:
        """Stop handling byte streams of `topic` (they are then dropped)."""
        self._streams.unregister_byte_stream_handler(topic)

    def set_fallback_text_stream_handler(self, handler: TextStreamHandler | None) -> None:
        """Handle text streams of any topic that has no handler of its own."""
        self._streams.set_fallback_text_handler(handler)

    def set_fallback_byte_stream_handler(self, handler: ByteStreamHandler | None) -> None:
        """Handle byte streams of any topic that has no handler of its own."""
        self._streams.set_fallback_byte_handler(handler)

    def set_fallback_rpc_handler(self, fallback: RpcFallbackHandler | None) -> None:
        """Resolve RPC methods that have no registered handler (see `RpcManager`)."""
        self._rpc.set_fallback_handler(fallback)

    async def connect(
        self, url: str, token: str, *, renew_token: Callable[[], str] | None = None
    ) -> None:
        """Join the room at `url` with `token`; returns once data can flow both ways.

        `renew_token` mints a fresh token for every rejoin (short-lived tokens outlive
        nothing); without it a rejoin uses the server's latest refresh token, or `token`.

        Raises a `ConnectError` (invalid URL, rejected token, unreachable server, WebRTC not
        connecting in time) without retrying: retry policy for the first join is the caller's.
        """
        if self._connection_state != "disconnected" or self._closing:
            raise ConnectError("room: connect called twice (a Room joins once; make a new one)")
        self._url, self._token = url, token
        self._renew_token = renew_token
        self._connection_state = "connecting"
        try:
            session, events = await self._open_session()
        except SignalClosedError as exc:
            # The server closed the socket mid-join (e.g. another session with our identity
            # joined): a failed join like any other, retriable.
            self._connection_state = "disconnected"
            raise ConnectError(
                f"room: signalling closed during the join: {exc}", retriable=True
            ) from exc
        except BaseException:
            self._connection_state = "disconnected"
            raise
        self._session = session
        self._connection_state = "connected"
        self._data_tracks.session_started(session.data_track)
        for name, coro in (
            ("lk-events", self._drain_events()),
            ("lk-streams", self._drain_streams()),
            ("lk-rpc", self._drain_rpc()),
            ("lk-supervisor", self._supervise()),
        ):
            self._spawn(name, coro)
        for event in events:
            self._post_event(event)

    async def disconnect(self, reason: str = "client disconnect") -> None:
        """Leave the room (telling the server, so we vanish at once) and stop every task."""
        await self._shutdown(reason, None)

    async def _shutdown(
        self, reason: str, error: Exception | None, server_reason: int | None = None
    ) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        session, self._session = self._session, None
        self._data_tracks.session_lost("room closed")
        if session is not None:
            await self._close_session(session, send_leave=True, reason=f"room closed: {reason}")
        self._rpc.fail_all(RpcError(RpcError.SEND_FAILED, "room closed"))
        self._streams.abort_all("room closed")
        await self._rpc.aclose()
        await self._streams.aclose()
        self._connection_state = "disconnected"
        # Let the dispatchers deliver what is queued (with Disconnected last), then stop them.
        self._post_event(Disconnected(reason, error, server_reason))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._event_inbox.join()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._closers:
            _done, late = await asyncio.wait(self._closers, timeout=FINAL_CLOSE_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._hub.close()
        self._closed.set()

    async def aclose(self) -> None:
        """Same as `disconnect()`."""
        await self.disconnect()

    async def __aenter__(self) -> Room:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.disconnect()

    async def wait_closed(self) -> None:
        """Wait until the room is closed for good."""
        await self._closed.wait()

    # ------------------------------------------- PacketTransport (streams, rpc)

    @property
    def local_identity(self) -> str:
        """Our identity."""
        return self._state.local.identity

    def participant_info(self, identity: str) -> models.ParticipantInfo | None:
        """The latest ParticipantInfo of a remote participant."""
        return self._state.remote_participants.get(identity)

    def remote_identities(self) -> Sequence[str]:
        """Identities of everyone else in the room."""
        return list(self._state.remote_participants)

    async def send_packet(self, packet: models.DataPacket, *, reliable: bool = True) -> None:
        """Send one DataPacket on the reliable or lossy channel (see `PacketTransport`)."""
        if self._e2ee is not None:
            packet = self._seal(self._e2ee, packet)
        if reliable:
            await self._send_reliable(packet, track=False)
        else:
            session = self._require_session()
            assert session.lossy is not None
            packet.kind = models.DataPacket.Kind.LOSSY
            session.lossy.try_send_lossy(encode(packet))

    async def send_packet_tracked(self, packet: models.DataPacket) -> Delivery:
        """Send one reliable DataPacket; returns once it is queued, with its `Delivery`.

        ``await delivery`` returns once livekit-server's SCTP stack acknowledged the packet and
        raises `NotConnectedError` (retriable) when the session is lost first, at the moment it
        is lost (the packet may still have arrived: resending gives at least once).
        """
        if self._e2ee is not None:
            packet = self._seal(self._e2ee, packet)
        delivery = await self._send_reliable(packet, track=True)
        assert delivery is not None
        return delivery

    def _seal(self, cryptor: DataCryptor, packet: models.DataPacket) -> models.DataPacket:
        """`packet` encrypted (an E2EE room), except RPC replies to the server.

        A server-initiated call (`RoomService.PerformRpc`) comes in the clear from an identity
        that is no participant, and the server reads the ack and response itself: encrypted,
        the call would only time out (the Rust SDK's `publish_data` encrypts them all).
        """
        if packet.WhichOneof("value") in _RPC_REPLIES:
            remote, to = self._state.remote_participants, packet.destination_identities
            if to and not any(identity in remote for identity in to):
                return packet
        return cryptor.seal(packet)

    async def _send_reliable(self, packet: models.DataPacket, *, track: bool) -> Delivery | None:
        session = self._require_session()
        channel = session.reliable
        assert channel is not None
        packet.kind = models.DataPacket.Kind.RELIABLE
        await channel.wait_writable()
        if self._session is not session:
            raise NotConnectedError("room: session lost while waiting to send")
        # From here to the send nothing awaits: sequence order is send order.
        packet.sequence = session.next_seq
        data = encode(packet)
        session.next_seq += 1
        if track:
            return channel.send_tracked(data)
        channel.send_now(data)
        return None

    def _require_session(self) -> _Session:
        session = self._session
        if session is None or self._connection_state != "connected":
            raise NotConnectedError(f"room: not connected ({self._connection_state})")
        return session

    # ------------------------------------------------------------ own state

    async def _update_own(
        self,
        *,
        attributes: Mapping[str, str] | None = None,
        metadata: str | None = None,
        name: str | None = None,
    ) -> None:
        session = self._require_session()
        request_id = self._next_request_id
        self._next_request_id += 1
        req = rtc.UpdateParticipantMetadata(request_id=request_id)
        if attributes is not None:
            req.attributes.update(attributes)
        if metadata is not None:
            req.metadata = metadata
        if name is not None:
            req.name = name
        future: asyncio.Future[rtc.RequestResponse] = asyncio.get_running_loop().create_future()
        self._pending_updates[request_id] = future
        try:
            await session.signal.send(rtc.SignalRequest(update_metadata=req))
            async with asyncio.timeout(self.options.state_update_timeout):
                response = await future
        except SignalClosedError as exc:
            raise NotConnectedError(f"room: state update not sent: {exc}") from exc
        except TimeoutError as exc:
            raise StateUpdateError(
                "room: the server did not confirm the state update within "
                f"{self.options.state_update_timeout:.0f} s",
                reason="TIMEOUT",
            ) from exc
        finally:
            self._pending_updates.pop(request_id, None)
        if response.reason != rtc.RequestResponse.Reason.OK:
            reason = rtc.RequestResponse.Reason.Name(response.reason)
            raise StateUpdateError(
                f"room: the server refused the state update: {reason}: {response.message}",
                reason=reason,
            )

    # ------------------------------------------------------------ sessions

    async def _join_signal(self) -> tuple[SignalClient, rtc.JoinResponse, bool]:
        """Open the signalling socket on the path the options ask for (see `RoomOptions`).

        Returns the client, the JoinResponse and whether the session is single peer connection.
        """
        mode = self.options.single_peer_connection
        single = mode is True or (mode == "auto" and not self._single_pc_unsupported)
        params = JoinParams(
            client_protocol=self.options.client_protocol,
            capabilities=self.options.capabilities,
            auto_subscribe=self.options.auto_subscribe,
            single_peer_connection=single,
        )
        signal = SignalClient(self.counters)
        try:
            join = await signal.connect(
                self._url, self._token, params, join_timeout=self.options.join_timeout
            )
            return signal, join, single
        except SinglePcUnsupportedError as exc:
            if mode is True:
                raise
            log.warning("room: %s; joining with dual peer connections (/rtc) instead", exc)
            self.counters.inc("signal.single_pc_fallback")
        params = replace(params, single_peer_connection=False)
        signal = SignalClient(self.counters)
        join = await signal.connect(
            self._url, self._token, params, join_timeout=self.options.join_timeout
        )
        # Only now: a 404 on both paths is a missing room, not an old server.
        self._single_pc_unsupported = True
        return signal, join, False

    async def _open_session(self) -> tuple[_Session, list[object]]:
        """Join once: signalling, peer connection(s), data channels. Returns the state diff."""
        signal, join, single = await self._join_signal()
        servers = self.options.ice_servers
        config = ice_configuration(join.ice_servers if servers is None else servers)
        session = _Session(join, signal, config, single_pc=single)

        def transport(target: int, name: str | None) -> PeerTransport:
            return PeerTransport(
                target,
                config,
                self.counters,
                on_datachannel=lambda channel: self._on_datachannel(session, channel),
                on_failed=lambda why: self._session_lost(session, why, True),
                name=name,
                turn_ca_file=self.options.turn_ca_file,
            )

        try:
            session.publisher = transport(rtc.SignalTarget.PUBLISHER, "single" if single else None)
            if single:
                session.subscriber = session.publisher
            else:
                session.subscriber = transport(rtc.SignalTarget.SUBSCRIBER, None)
            self._prepare_publisher(session)
            session.reader = spawn(self._read_signal(session), name="lk-signal", owner=self._tasks)
            signal.start_pings(join.ping_interval or 5, join.ping_timeout or 15)
            await self._negotiate_publisher(session)
            try:
                async with asyncio.timeout(self.options.webrtc_timeout):
                    # Single mode: our channels carry both directions, and the server counts
                    # us established once both are open (livekit-protocol.md §1.8).
                    await session.channels_open.wait()
                    if not single and join.subscriber_primary:
                        # Otherwise (a token without canSubscribe) the server sends no offer and
                        # downstream data comes on the publisher's own channels.
                        await session.subscriber.connected.wait()
                        await session.downstream_open.wait()
            except TimeoutError as exc:
                states = ", ".join(f"{t.name} {t.pc.connectionState}" for t in _transports(session))
                # Connected but not open: the DTLS/SCTP handshakes are what is late (load).
                opened = "open" if session.channels_open.is_set() else "not open"
                states += f"; our data channels {opened}"
                raise ServerUnreachableError(
                    f"room: WebRTC to {self._url} did not connect within "
                    f"{self.options.webrtc_timeout:.0f} s ({states}); check the server's node "
                    "IP and UDP port reachability"
                ) from exc
            if session.lost:
                raise ServerUnreachableError("room: session lost while joining")
        except BaseException:
            await self._close_session(session, send_leave=True, reason="join failed")
            raise
        self._deduper.clear()
        events: list[object] = list(self._state.reset(join))
        log.info(
            "room: joined %r as %r (sid %s, server %s, %d others, %s)",
            join.room.name,
            join.participant.identity,
            join.participant.sid,
            join.server_info.version,
            len(join.other_participants),
            "single peer connection" if single else "dual peer connections",
        )
        return session, events

    def _prepare_publisher(self, session: _Session) -> None:
        assert session.publisher is not None
        reliable = session.publisher.create_data_channel("_reliable", lossy=False)
        lossy = session.publisher.create_data_channel("_lossy", lossy=True)
        session.reliable = FlowControlledChannel(reliable, self.counters, lossy=False)
        session.lossy = FlowControlledChannel(lossy, self.counters, lossy=True)
        # Data tracks (`bridge.room.data_tracks`): opened with the others, but the join does
        # not wait for it (the server makes its own in dual mode for what we subscribe to).
        session.data_track = session.publisher.create_data_channel(DATA_TRACK_LABEL, lossy=True)
        self._attach_receiver(session.data_track)
        for channel in (reliable, lossy):
            self._attach_receiver(channel)

            @channel.on("open")
            def _opened() -> None:
                if session.reliable and session.lossy:  # noqa: SIM102 - readable as is
                    if session.reliable.is_open and session.lossy.is_open:
                        session.channels_open.set()
                        if session.single_pc:
                            session.downstream_open.set()

    async def _negotiate_publisher(self, session: _Session) -> None:
        assert session.publisher is not None
        sdp = await session.publisher.offer()
        session.offer_id += 1
        offer = rtc.SessionDescription(type="offer", sdp=sdp, id=session.offer_id)
        await session.signal.send(rtc.SignalRequest(offer=offer))

    def _on_datachannel(self, session: _Session, channel: RTCDataChannel) -> None:
        # Server-created channels on the subscriber connection: where downstream data arrives.
        self._attach_receiver(channel)
        if channel.label == "_reliable":
            if channel.readyState == "open":
                session.downstream_open.set()
            else:
                channel.on("open", session.downstream_open.set)

    def _attach_receiver(self, channel: RTCDataChannel) -> None:
        label = channel.label
        if label == "_reliable":
            kind = DataPacketKind.KIND_RELIABLE
        elif label == "_lossy":
            kind = DataPacketKind.KIND_LOSSY
        elif label == DATA_TRACK_LABEL:
            # Binary data-track packets, not DataPackets.
            channel.on("message", self._data_tracks.on_channel_message)
            return
        else:
            channel.on("message", lambda _m: self.counters.inc("packets.unknown_channel"))
            return
        channel.on("message", lambda message: self._on_message(label, kind, message))

    def _on_message(self, label: str, kind: DataPacketKind, message: bytes | str) -> None:
        packet = decode(message, label, self.counters)
        if packet is None:
            return
        if kind == DataPacketKind.KIND_RELIABLE and self._deduper.is_duplicate(packet):
            self.counters.inc("packets.duplicate")
            return
        which = packet.WhichOneof("value")
        encrypted = which == "encrypted_packet"
        if encrypted:
            opened = self._open_encrypted(packet)
            if opened is None:
                return
            packet, which = opened, opened.WhichOneof("value")
        if which == "user":
            self.counters.inc("packets.received")
            self._post_event(DataReceived(received_user_packet(packet, kind, encrypted)))
        elif which in _STREAM_KINDS:
            if self._is_protocol_stream(packet, which):
                # RPC v2 travels as lk.rpc_* streams: keep it off the path where a slow
                # application reader can hold everything back.
                self._enqueue(self._rpc_inbox, packet, "rpc")
            else:
                self._enqueue(self._stream_inbox, packet, "streams")
        elif which in _RPC_KINDS:
            self._enqueue(self._rpc_inbox, packet, "rpc")
        elif which is None:
            self.counters.inc("packets.unknown_kind")
            log.debug("room: ignored a data packet of a kind newer than our protocol stubs")
        else:
            self.counters.inc(f"packets.unhandled.{which}")
            log.debug("room: ignored a %s data packet", which)

    def _open_encrypted(self, packet: models.DataPacket) -> models.DataPacket | None:
        """The plain packet inside an encrypted one; None (counted, logged once) if we cannot."""
        if self._e2ee is not None:
            try:
                return self._e2ee.open(packet)
            except DecryptError as exc:
                why = f"it does not decrypt: {exc}"
        else:
            why = "this room has no E2EE key configured (livekit.e2ee)"
        # Never forwarded as garbage: the ciphertext means nothing to a bus.
        self.counters.inc("rejected.encrypted")
        if not self._encrypted_rejected_logged:
            self._encrypted_rejected_logged = True
            log.warning(
                "room %r: dropped an end-to-end encrypted packet from %r: %s (every such "
                "packet is counted as rejected.encrypted; this is logged once per room)",
                self._state.room.name,
                packet.participant_identity,
                why,
            )
        return None

    def _is_protocol_stream(self, packet: models.DataPacket, which: str) -> bool:
        if which == "stream_header":
            if not packet.stream_header.topic.startswith("lk.rpc_"):
                return False
            if len(self._protocol_streams) >= 10_000:
                self._protocol_streams.pop(next(iter(self._protocol_streams)))
            self._protocol_streams[packet.stream_header.stream_id] = None
            return True
        if which == "stream_chunk":
            return packet.stream_chunk.stream_id in self._protocol_streams
        stream_id = packet.stream_trailer.stream_id
        if stream_id in self._protocol_streams:
            del self._protocol_streams[stream_id]
            return True
        return False

    def _enqueue(
        self, queue: asyncio.Queue[models.DataPacket], packet: models.DataPacket, path: str
    ) -> None:
        try:
            queue.put_nowait(packet)
        except asyncio.QueueFull:
            self.counters.inc(f"{path}.inbox_dropped")
            log.error("room: %s inbox full (%d packets): dropped a packet", path, queue.maxsize)

    def _post_event(self, event: object) -> None:
        try:
            self._event_inbox.put_nowait(event)
        except asyncio.QueueFull:
            self.counters.inc("events.dropped")
            log.error(
                "room: event queue full (%d): dropped %s; consumers are too slow",
                self._event_inbox.maxsize,
                type(event).__name__,
            )

    async def _read_signal(self, session: _Session) -> None:
        try:
            while True:
                msg = await session.signal.recv()
                await self._handle_signal(session, msg)
        except SignalClosedError as exc:
            self._session_lost(session, f"signalling lost: {exc}", True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("room: signal handling failed")
            self._session_lost(session, f"signal handling failed: {exc!r}", True)

    async def _handle_signal(self, session: _Session, msg: rtc.SignalResponse) -> None:
        kind = msg.WhichOneof("message")
        assert session.subscriber is not None and session.publisher is not None
        if kind is not None and session is self._session and self._data_tracks.on_signal(msg, kind):
            return
        if kind == "offer" and session.single_pc:
            # The server never offers in single mode (it asks for media sections instead);
            # answering on the connection we offer would collide with our own negotiation.
            self.counters.inc("signal.unexpected_offer")
            log.warning("room: ignored an offer from the server (single peer connection mode)")
        elif kind == "offer":
            sdp = await session.subscriber.answer(msg.offer.sdp)
            answer = rtc.SessionDescription(type="answer", sdp=sdp, id=msg.offer.id)
            await session.signal.send(rtc.SignalRequest(answer=answer))
        elif kind == "answer":
            await session.publisher.apply_answer(msg.answer.sdp)
        elif kind == "trickle":
            target = (
                session.subscriber
                if msg.trickle.target == rtc.SignalTarget.SUBSCRIBER
                else session.publisher
            )
            await target.add_trickle(msg.trickle.candidateInit)
        elif kind == "update":
            if session is self._session:
                self._apply_events(self._state.apply_participant_update(msg.update.participants))
                self._data_tracks.sync_subscriptions()
        elif kind == "room_update":
            if session is self._session:
                self._apply_events(self._state.apply_room_update(msg.room_update.room))
        elif kind == "leave":
            action = msg.leave.action
            reason = models.DisconnectReason.Name(msg.leave.reason)
            rejoin = action != rtc.LeaveRequest.Action.DISCONNECT
            if not session.lost:
                session.leave_reason = msg.leave.reason
            self._session_lost(session, f"server asked us to leave ({reason})", rejoin)
        elif kind == "refresh_token":
            self._token = msg.refresh_token
        elif kind == "request_response":
            future = self._pending_updates.get(msg.request_response.request_id)
            if future is not None and not future.done():
                future.set_result(msg.request_response)
        elif kind == "media_sections_requirement":
            # Single mode: the server wants receive m-lines for media it would send us, which
            # only happens once we are subscribed to a track (auto_subscribe, or the server
            # API). We carry data only; adding transceivers would make aiortc receive and
            # decode media nobody reads, so the subscription just stays without media.
            wanted = msg.media_sections_requirement
            self.counters.inc("signal.media_sections_ignored")
            log.info(
                "room: ignored the server's request for %d audio and %d video receive sections "
                "(this participant receives data only)",
                wanted.num_audios,
                wanted.num_videos,
            )
        else:
            log.debug("room: ignored signal message %s", kind)

    def _apply_events(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, ParticipantDisconnected):
                identity = event.info.identity
                self._deduper.forget(event.info.sid)
                self._streams.on_participant_left(identity)
                self._rpc.on_participant_left(identity)
            self._post_event(event)

    def _session_lost(self, session: _Session, reason: str, rejoin: bool) -> None:
        if session.lost:
            return
        session.lost = True
        self._lost.put_nowait((session, reason, rejoin))

    async def _close_session(self, session: _Session, *, send_leave: bool, reason: str) -> None:
        session.lost = True
        # At once, not when aiortc's slow close gets to the association: the callers retry.
        if session.reliable is not None:
            session.reliable.fail_deliveries(reason)
        if send_leave:
            leave = rtc.LeaveRequest(
                reason=models.DisconnectReason.CLIENT_INITIATED,
                action=rtc.LeaveRequest.Action.DISCONNECT,
            )
            with contextlib.suppress(SignalClosedError):
                await session.signal.send(rtc.SignalRequest(leave=leave))
        if session.reader is not None and session.reader is not asyncio.current_task():
            session.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.reader
        await session.signal.close()
        # aiortc's close can take tens of seconds when the server is gone (aioice retransmits
        # the TURN deallocation). Give it a moment, then let it finish in the background: a
        # rejoin must not wait for the old session's goodbyes.
        closers = [
            spawn(transport.close(), name=f"lk-close-{transport.name}", owner=self._closers)
            for transport in _transports(session)
        ]
        if closers:
            await asyncio.wait(closers, timeout=CLOSE_GRACE)

    async def _supervise(self) -> None:
        while True:
            session, reason, rejoin = await self._lost.get()
            if session is not self._session or self._closing:
                continue
            log.warning("room: session lost: %s", reason)
            self._connection_state = "reconnecting"
            self._session = None
            self._data_tracks.session_lost(f"connection lost: {reason}")
            await self._close_session(session, send_leave=False, reason=reason)
            self._rpc.fail_all(RpcError(RpcError.SEND_FAILED, f"connection lost: {reason}"))
            self._streams.abort_all(f"connection lost: {reason}")
            if not (rejoin and self.options.reconnect):
                self._spawn("lk-close", self._shutdown(reason, None, session.leave_reason))
                return
            self._post_event(Reconnecting(reason))
            try:
                new, events, attempts = await self._rejoin()
            except ConnectError as exc:
                log.error("room: giving up on %r: %s", self._state.room.name, exc)
                self._spawn("lk-close", self._shutdown(f"reconnect failed: {exc}", exc))
                return
            self._session = new
            self._connection_state = "connected"
            self._data_tracks.session_started(new.data_track)
            for event in events:
                if isinstance(event, ParticipantDisconnected):
                    self._streams.on_participant_left(event.info.identity)
                    self._rpc.on_participant_left(event.info.identity)
                self._post_event(event)
            self._post_event(Reconnected(attempts))
            log.info("room: rejoined %r after %d attempt(s)", self._state.room.name, attempts)

    async def _rejoin(self) -> tuple[_Session, list[object], int]:
        opts = self.options
        stop: tenacity.stop.stop_base = tenacity.stop_never
        if opts.reconnect_max_attempts is not None:
            stop = tenacity.stop_after_attempt(opts.reconnect_max_attempts)
        retrying = tenacity.AsyncRetrying(
            # Full jitter: rejoining bridges do not hit a restarted server in lockstep.
            wait=tenacity.wait_random_exponential(
                multiplier=opts.reconnect_initial_delay, max=opts.reconnect_max_delay
            ),
            stop=stop,
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, ConnectError) and e.retriable
            ),
            before_sleep=lambda rs: log.warning(
                "room: rejoin attempt %d failed: %s",
                rs.attempt_number,
                rs.outcome and rs.outcome.exception(),
            ),
            reraise=True,
        )
        attempts = 0
        async for attempt in retrying:
            with attempt:
                attempts += 1
                if self._renew_token is not None:
                    self._token = self._renew_token()
                session, events = await self._open_session()
                return session, events, attempts
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------ dispatchers

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        spawn(coro, name=name, owner=self._tasks)

    async def _drain_events(self) -> None:
        while True:
            event = await self._event_inbox.get()
            try:
                await self._hub.publish(event)
            finally:
                self._event_inbox.task_done()

    async def _drain_streams(self) -> None:
        while True:
            packet = await self._stream_inbox.get()
            try:
                await self._streams.on_packet(packet)
            except Exception:
                self.counters.inc("streams.handler_error")
                log.exception("room: stream packet handling failed")

    async def _drain_rpc(self) -> None:
        while True:
            packet = await self._rpc_inbox.get()
            try:
                if packet.WhichOneof("value") in _STREAM_KINDS:
                    await self._streams.on_packet(packet)
                else:
                    await self._rpc.on_packet(packet)
            except Exception:
                self.counters.inc("rpc.handler_error")
                log.exception("room: rpc packet handling failed")

    def __repr__(self) -> str:
        return f"Room(name={self.name!r}, state={self._connection_state!r})"


def _transports(session: _Session) -> list[PeerTransport]:
    """The session's peer connections, each once (single mode has one under two names)."""
    found: list[PeerTransport] = []
    for transport in (session.publisher, session.subscriber):
        if transport is not None and transport not in found:
            found.append(transport)
    return found
