"""The WebRTC peer connections of a LiveKit session (aiortc), data channels only.

In LiveKit's dual peer connection mode (`/rtc`) the server offers the *subscriber* connection
(it creates `_reliable`, `_lossy` and `_data_track` channels in-band: downstream data arrives
there) and the client offers the *publisher* connection with its own `_reliable` and `_lossy`
channels (upstream data). In single peer connection mode (`/rtc/v1`) there is only the
connection the client offers, and its two channels carry both directions; the server never
offers. `PeerTransport` wraps one RTCPeerConnection: offer/answer, trickled candidates (queued
until the remote description is set, since aiortc drops them otherwise), and its state. Every
connection gathers relay candidates on every TURN server the JoinResponse offers (UDP, TCP and
TLS), which aioice alone does not (`gather_on_every_turn_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aioice
import aioice.ice
from aioice.candidate import candidate_foundation, candidate_priority
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcicetransport import parse_stun_turn_uri
from aiortc.sdp import candidate_from_sdp
from livekit.protocol import rtc

from bridge.room import direct_receive
from bridge.room.types import Counters

log = logging.getLogger("roombus.room.transport")

# Receive buffer asked for each ICE UDP socket. Python reads the socket between other work; at
# full speed the kernel's default (~200 KB, about 90 packets) overflows and the dropped packets
# come back only through SCTP retransmission timers (1 s gaps). The kernel caps the request at
# net.core.rmem_max unless we may force it (root).
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024


def enlarge_receive_buffers(pc: RTCPeerConnection) -> int:
    """Ask for `UDP_RECEIVE_BUFFER` on every ICE socket of `pc`; returns how many were set.

    Best effort: aioice keeps its sockets private, so a layout change just leaves the defaults.
    """
    # Data-only connections bundle everything on the SCTP transport's DTLS/ICE transports.
    if pc.sctp is None:
        return 0
    try:
        protocols = pc.sctp.transport.transport.iceGatherer._connection._protocols
    except AttributeError:
        return 0
    done = 0
    for protocol in protocols:
        transport = getattr(protocol, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            continue
        for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, UDP_RECEIVE_BUFFER)
            except OSError:
                continue
            done += 1
            break
    return done


# A PEM file of certificate authorities trusted for `turns:` servers besides the system's (a
# TURN/TLS server with a private certificate). Read when a connection gathers its candidates.
TURN_CA_FILE_ENV = "ROOMBUS_TURN_CA_FILE"

# Seconds a connection waits for its TURN allocations (and STUN answer) while gathering: aioice's
# own bound. A TURN server the network blocks costs this much once per connection.
GATHER_TIMEOUT = 5

# Relay candidates' local preference by how we reach the TURN server, as libwebrtc orders them:
# UDP, then TCP, then TLS (the costliest path is the last resort).
_RELAY_PREFERENCE = {"udp": 65535, "tcp": 49151, "tls": 32767}


@dataclass(frozen=True)
class TurnServer:
    """One TURN URL of a JoinResponse, with its credentials."""

    url: str
    host: str
    port: int
    # How we reach the server: "udp", "tcp" (`turn:...?transport=tcp`) or "tls" (`turns:`).
    kind: Literal["udp", "tcp", "tls"]
    username: str | None
    password: str | None
    # CA certificates trusted besides the system's for a "tls" server (`turn_ssl_context`).
    ca_file: str | None = None


def _ice_server_urls(server: RTCIceServer) -> list[str]:
    return list(server.urls) if isinstance(server.urls, list) else [server.urls]


def ice_configuration(servers: Sequence[rtc.ICEServer]) -> RTCConfiguration:
    """Aiortc's configuration from the ICE servers of a JoinResponse: every server it offers.

    `stun:` and every TURN URL aioice can reach (`turn:` over UDP or TCP, `turns:` over TLS) are
    kept; what aioice cannot use (`stuns:`, TURN over DTLS, malformed or IPv6-literal URLs) is
    left out with a log line. aioice asks only the first STUN server; `PeerTransport` makes each
    connection allocate on every TURN server (aioice alone would use only the first one).
    """
    result = []
    for server in servers:
        urls = []
        for url in server.urls:
            try:
                parsed = parse_stun_turn_uri(url)
            except ValueError as exc:
                log.info("transport: ICE server %r left out: %s", url, exc)
                continue
            if parsed["scheme"] == "stun" or _turn_kind(parsed) is not None:
                urls.append(url)
            else:
                log.info("transport: ICE server %r left out: aioice cannot use it", url)
        if urls:
            result.append(
                RTCIceServer(
                    urls=urls,
                    username=server.username or None,
                    credential=server.credential or None,
                )
            )
    return RTCConfiguration(iceServers=result)


def _turn_kind(parsed: dict[str, object]) -> Literal["udp", "tcp", "tls"] | None:
    scheme, transport = parsed["scheme"], parsed.get("transport")
    if scheme == "turn" and transport in ("udp", "tcp"):
        return "udp" if transport == "udp" else "tcp"
    if scheme == "turns" and transport == "tcp":
        return "tls"
    return None


def turn_servers(config: RTCConfiguration, ca_file: str | None = None) -> list[TurnServer]:
    """The TURN servers of `config` (from `ice_configuration`), in the server's order.

    `ca_file`: CA certificates trusted for `turns:` servers besides the system's (None:
    `$ROOMBUS_TURN_CA_FILE`, if set).
    """
    result = []
    for server in config.iceServers or []:
        for url in _ice_server_urls(server):
            try:
                parsed = parse_stun_turn_uri(url)
            except ValueError:
                continue
            kind = _turn_kind(parsed)
            if kind is None or server.credentialType != "password":
                continue
            result.append(
                TurnServer(
                    url=url,
                    host=str(parsed["host"]),
                    port=int(parsed["port"]),
                    kind=kind,
                    username=server.username,
                    password=server.credential,
                    ca_file=ca_file or os.environ.get(TURN_CA_FILE_ENV) or None,
                )
            )
    return result


def turn_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The TLS context for `turns:` servers: the system's CAs, plus those of `ca_file`."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


async def _relay_candidate(connection: Any, component: int, server: TurnServer) -> tuple[Any, Any]:
    """Allocate on `server` for `connection`; the relay candidate and its protocol."""
    # aioice hands `turn_ssl` to asyncio as `ssl=`, so a context works (typed as a bool).
    relayed_candidate: Any = aioice.ice.relayed_candidate
    candidate, protocol = await relayed_candidate(
        component=component,
        hide_related_address=connection._transport_policy == aioice.ice.TransportPolicy.RELAY,
        protocol_factory=lambda: aioice.ice.StunProtocol(connection),
        turn_server=(server.host, server.port),
        turn_username=server.username,
        turn_password=server.password,
        turn_ssl=turn_ssl_context(server.ca_file) if server.kind == "tls" else False,
        turn_transport="udp" if server.kind == "udp" else "tcp",
    )
    # Its own foundation and a preference by path (relays of one server share an address).
    protocol.local_candidate = aioice.Candidate(
        foundation=candidate_foundation("relay", f"udp/{server.kind}", candidate.host),
        component=candidate.component,
        transport=candidate.transport,
        priority=candidate_priority(component, "relay", _RELAY_PREFERENCE[server.kind]),
        host=candidate.host,
        port=candidate.port,
        type="relay",
        related_address=candidate.related_address,
        related_port=candidate.related_port,
    )
    setattr(protocol, "roombus_turn", server)  # noqa: B010 (aioice's class has no such slot)
    return protocol.local_candidate, protocol


def _can_gather_relays(connection: Any) -> bool:
    """Whether this aioice exposes what `gather_on_every_turn_server` relies on."""
    try:
        params = inspect.signature(aioice.ice.relayed_candidate).parameters
        inspect.signature(connection.get_component_candidates)
    except (AttributeError, TypeError, ValueError):
        return False
    needed = {"component", "protocol_factory", "turn_server", "turn_ssl", "turn_transport"}
    return (
        needed <= params.keys()
        and hasattr(connection, "turn_server")
        and isinstance(getattr(connection, "_protocols", None), list)
    )


def gather_on_every_turn_server(
    connection: Any, servers: Sequence[TurnServer], counters: Counters, name: str = "ice"
) -> bool:
    """Make aioice `connection` allocate a relay candidate on every one of `servers`.

    aioice takes one TURN server; this replaces that with all of them, gathered in parallel with
    the host and STUN candidates and within the same bound (`GATHER_TIMEOUT`). A server that
    fails or does not answer in time (a blocked port, an untrusted certificate) only logs and
    counts `transport.turn_failed`. Returns False, leaving aioice's own single TURN server,
    when this aioice lacks what that needs.
    """
    if not servers or not _can_gather_relays(connection):
        return False
    original = connection.get_component_candidates
    connection.turn_server = None  # ours gathers them all

    async def get_component_candidates(
        component: int,
        addresses: list[str],
        timeout: int = GATHER_TIMEOUT,  # noqa: ASYNC109 (aioice's signature)
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        relays = {
            asyncio.ensure_future(_relay_candidate(connection, component, server)): server
            for server in servers
        }
        try:
            candidates: list[Any] = await original(
                component=component, addresses=addresses, timeout=timeout
            )
            remaining = max(0.0, timeout - (loop.time() - start))
            await asyncio.wait(relays, timeout=remaining)
        finally:
            for task in relays:
                task.cancel()
        for task, server in relays.items():
            if task.cancelled() or not task.done():
                failure = f"no allocation within {timeout} s"
            elif (exc := task.exception()) is not None:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                candidate, protocol = task.result()
                candidates.append(candidate)
                connection._protocols.append(protocol)
                log.debug("transport: %s: relay candidate via %s", name, server.url)
                continue
            counters.inc("transport.turn_failed")
            log.info("transport: %s: TURN server %s unusable: %s", name, server.url, failure)
        return candidates

    connection.get_component_candidates = get_component_candidates
    return True


def selected_route(pc: RTCPeerConnection) -> str | None:
    """How `pc`'s data travels now: "host", "srflx", "prflx", or "relay <TURN URL>".

    None before a pair is nominated, or when aioice's layout is unknown.
    """
    if pc.sctp is None:
        return None
    try:
        pair = pc.sctp.transport.transport.iceGatherer._connection._nominated.get(1)
    except AttributeError:
        return None
    if pair is None:
        return None
    kind = str(pair.local_candidate.type)
    server = getattr(pair.protocol, "roombus_turn", None)
    return f"{kind} {server.url}" if isinstance(server, TurnServer) else kind


class PeerTransport:
    """One peer connection (publisher, subscriber, or the single one) of the session."""

    def __init__(
        self,
        target: int,
        config: RTCConfiguration,
        counters: Counters,
        *,
        on_datachannel: Callable[[RTCDataChannel], None],
        on_failed: Callable[[str], None],
        name: str | None = None,
        turn_ca_file: str | None = None,
    ) -> None:
        self.target = target
        # For logs and task names: "publisher", "subscriber", or "single".
        self.name = name or rtc.SignalTarget.Name(target).lower()
        direct_receive.install()  # idempotent; the stock route on unknown aiortc/aioice versions
        self.pc = RTCPeerConnection(configuration=config)
        self._turn = turn_servers(config, turn_ca_file)
        self.connected = asyncio.Event()
        self._counters = counters
        self._pending_candidates: list[dict[str, object]] = []
        self._remote_set = False
        self._on_failed = on_failed
        self._closed = False
        self.pc.on("datachannel", on_datachannel)
        self.pc.on("connectionstatechange", self._state_changed)

    def _state_changed(self) -> None:
        state = self.pc.connectionState
        log.debug("transport: %s peer connection %s", self.name, state)
        if state == "connected":
            log.debug("transport: %s connected (%s)", self.name, selected_route(self.pc))
            self.connected.set()
        elif state in ("failed", "closed") and not self._closed:
            self._on_failed(f"{self.name} peer connection {state}")

    async def answer(self, offer_sdp: str) -> str:
        """Apply the server's offer and return our answer SDP."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await self._remote_description_set()
        self._use_every_turn_server()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        enlarge_receive_buffers(self.pc)
        return str(self.pc.localDescription.sdp)

    async def offer(self) -> str:
        """Create our offer (gathering candidates into it) and return its SDP."""
        self._use_every_turn_server()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        enlarge_receive_buffers(self.pc)
        return str(self.pc.localDescription.sdp)

    def _use_every_turn_server(self) -> None:
        """Before gathering: every ICE agent of the connection allocates on every TURN server."""
        if not self._turn:
            return
        transports = getattr(self.pc, "_RTCPeerConnection__iceTransports", None)
        if not isinstance(transports, set):
            transports = {self.pc.sctp.transport.transport} if self.pc.sctp is not None else set()
        for ice in transports:
            connection = getattr(getattr(ice, "iceGatherer", None), "_connection", None)
            if connection is None or getattr(connection, "roombus_turn_installed", False):
                continue
            if gather_on_every_turn_server(connection, self._turn, self._counters, self.name):
                connection.roombus_turn_installed = True
            else:
                log.warning(
                    "transport: %s: this aioice cannot gather on several TURN servers; "
                    "only the first, %s, is used",
                    self.name,
                    self._turn[0].url,
                )
                connection.roombus_turn_installed = True

    @property
    def route(self) -> str | None:
        """How the connection's data travels now (see `selected_route`)."""
        return selected_route(self.pc)

    async def apply_answer(self, answer_sdp: str) -> None:
        """Apply the server's answer to our offer."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        await self._remote_description_set()

    async def _remote_description_set(self) -> None:
        self._remote_set = True
        pending, self._pending_candidates = self._pending_candidates, []
        for init in pending:
            await self._add_candidate(init)

    async def add_trickle(self, candidate_init: str) -> None:
        """Add a candidate the server trickled (JSON of a pion ICECandidateInit)."""
        try:
            init = json.loads(candidate_init)
            if not isinstance(init, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self._counters.inc("transport.malformed_candidate")
            log.warning(
                "transport: %s: ignored malformed candidate %r: %s",
                self.name,
                candidate_init[:200],
                exc,
            )
            return
        if not self._remote_set:
            self._pending_candidates.append(init)
            return
        await self._add_candidate(init)

    async def _add_candidate(self, init: dict[str, object]) -> None:
        text = init.get("candidate")
        if not isinstance(text, str) or not text:
            return  # an end-of-candidates marker: aiortc needs none
        try:
            candidate = candidate_from_sdp(text.removeprefix("candidate:"))
            mid = init.get("sdpMid")
            index = init.get("sdpMLineIndex")
            candidate.sdpMid = mid if isinstance(mid, str) else None
            candidate.sdpMLineIndex = index if isinstance(index, int) else 0
            await self.pc.addIceCandidate(candidate)
        except (ValueError, IndexError, KeyError) as exc:
            self._counters.inc("transport.malformed_candidate")
            log.warning("transport: %s: ignored candidate %r: %s", self.name, text[:200], exc)

    def create_data_channel(self, label: str, *, lossy: bool) -> RTCDataChannel:
        """A client-created channel (publisher side): ordered reliable, or unordered lossy."""
        if lossy:
            return self.pc.createDataChannel(label, ordered=False, maxRetransmits=0)
        return self.pc.createDataChannel(label, ordered=True)

    async def close(self) -> None:
        """Close the peer connection (idempotent, never raises)."""
        self._closed = True
        with contextlib.suppress(Exception):
            await self.pc.close()
