"""The WebRTC peer connections of a LiveKit session (aiortc), data channels only.

In LiveKit's dual peer connection mode (`/rtc`) the server offers the *subscriber* connection
(it creates `_reliable`, `_lossy` and `_data_track` channels in-band: downstream data arrives
there) and the client offers the *publisher* connection with its own `_reliable` and `_lossy`
channels (upstream data). In single peer connection mode (`/rtc/v1`) there is only the
connection the client offers, and its two channels carry both directions; the server never
offers. `PeerTransport` wraps one RTCPeerConnection: offer/answer, trickled candidates (queued
until the remote description is set, since aiortc drops them otherwise), and its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Sequence

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp
from livekit.protocol import rtc

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


def ice_configuration(servers: Sequence[rtc.ICEServer]) -> RTCConfiguration:
    """Aiortc's configuration from the ICE servers of a JoinResponse.

    Only STUN and UDP TURN are kept: aioice has no ICE-TCP, and the server's TCP fallback is
    meant to be off for us (see livekit-protocol.md §7).
    """
    result = []
    for server in servers:
        urls = [u for u in server.urls if u.startswith("stun:") or _is_udp_turn(u)]
        if urls:
            result.append(
                RTCIceServer(
                    urls=urls,
                    username=server.username or None,
                    credential=server.credential or None,
                )
            )
    return RTCConfiguration(iceServers=result)


def _is_udp_turn(url: str) -> bool:
    return url.startswith("turn:") and "transport=tcp" not in url


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
    ) -> None:
        self.target = target
        # For logs and task names: "publisher", "subscriber", or "single".
        self.name = name or rtc.SignalTarget.Name(target).lower()
        self.pc = RTCPeerConnection(configuration=config)
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
            self.connected.set()
        elif state in ("failed", "closed") and not self._closed:
            self._on_failed(f"{self.name} peer connection {state}")

    async def answer(self, offer_sdp: str) -> str:
        """Apply the server's offer and return our answer SDP."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await self._remote_description_set()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        enlarge_receive_buffers(self.pc)
        return str(self.pc.localDescription.sdp)

    async def offer(self) -> str:
        """Create our offer (gathering candidates into it) and return its SDP."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        enlarge_receive_buffers(self.pc)
        return str(self.pc.localDescription.sdp)

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
