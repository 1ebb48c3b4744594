"""Flow control for sending on aiortc data channels.

aiortc's `RTCDataChannel.send` never blocks and queues without limit, so a fast producer would
grow memory without bound. `FlowControlledChannel` applies the LiveKit SDKs' watermark scheme:
reliable sends wait while `bufferedAmount` is above the high-water mark until it falls to the
low-water mark; lossy sends are dropped (and counted) while the channel is congested, since
late lossy data is worthless.

A reliable send may be tracked (`send_tracked`): it returns a `Delivery` that resolves once
livekit-server's SCTP stack acknowledged the message (`bridge.room.delivery`). Lossy sends are
never tracked: unordered and without retransmission, "the peer has it" is not a promise they
can keep (and a congested lossy send is dropped locally anyway).

Creating the first channel wrapper installs our SCTP throughput fixes and the delivery hooks
(`bridge.room.sctp`), before any association carries data.
"""

from __future__ import annotations

import asyncio
import logging

from aiortc import RTCDataChannel

from bridge.room import sctp
from bridge.room.delivery import Delivery, DeliveryTracker, connection_lost
from bridge.room.errors import NotConnectedError
from bridge.room.types import Counters

log = logging.getLogger("roombus.room.datachannel")

# The JS SDK's reliable watermarks: wait above 1 MiB buffered, resume at 64 KiB.
RELIABLE_HIGH_WATER = 1024 * 1024
RELIABLE_LOW_WATER = 64 * 1024
# Lossy data is dropped while more than this is waiting to be handed to SCTP.
LOSSY_HIGH_WATER = 64 * 1024


class FlowControlledChannel:
    """A send-side wrapper of one data channel with watermark flow control."""

    def __init__(self, channel: RTCDataChannel, counters: Counters, *, lossy: bool) -> None:
        sctp.install()  # idempotent; falls back to stock aiortc on an unknown version
        self._tracking = sctp.install_delivery_tracking()
        self.channel = channel
        self.lossy = lossy
        self._counters = counters
        self._drained = asyncio.Event()
        self._drained.set()
        channel.bufferedAmountLowThreshold = RELIABLE_LOW_WATER
        channel.on("bufferedamountlow", self._drained.set)
        channel.on("close", self._drained.set)
        self._tracker: DeliveryTracker | None = None
        if not lossy:
            # The channel may close while the association lives on (a stream reset): what it
            # still had queued is then never sent.
            channel.on("close", lambda: self.fail_deliveries("data channel closed"))

    @property
    def is_open(self) -> bool:
        """Whether the channel can send now."""
        return bool(self.channel.readyState == "open")

    def _check_open(self) -> None:
        if not self.is_open:
            raise NotConnectedError(
                f"data channel {self.channel.label} is {self.channel.readyState}, not open"
            )

    async def wait_writable(self) -> None:
        """Wait until a reliable send may go ahead (buffer below the high-water mark)."""
        while True:
            self._check_open()
            if self.channel.bufferedAmount <= RELIABLE_HIGH_WATER:
                return
            self._drained.clear()
            self._counters.inc("datachannel.backpressure_waits")
            await self._drained.wait()

    def send_now(self, data: bytes) -> None:
        """Hand `data` to the channel at once (callers waited in `wait_writable` first)."""
        self._check_open()
        self.channel.send(data)

    def send_tracked(self, data: bytes) -> Delivery:
        """`send_now`, returning the `Delivery` of `data` (reliable channels only).

        Without delivery tracking (an aiortc version our hooks do not know) the returned
        delivery is already resolved: hand-off counts as delivery, as a logged warning said.
        """
        if self.lossy:
            raise ValueError("datachannel: lossy sends are not tracked")
        self._check_open()
        delivery = Delivery()
        if not self._tracking:
            self.channel.send(data)
            delivery._resolve()
            return delivery
        tracker = self._tracker
        if tracker is None:
            tracker = self._tracker = sctp.deliveries(self.channel.transport)
        self.channel.send(sctp.tracked(data, delivery))
        # After the send succeeded, and before anything can assign its TSN (a later task).
        tracker.add(delivery)
        return delivery

    def fail_deliveries(self, reason: str) -> int:
        """Fail the pending deliveries of this channel's association (the session is over).

        Returns how many failed; later tracked sends on this association fail at once.
        """
        tracker = self._tracker
        if tracker is None:
            return 0
        return tracker.fail_all(connection_lost(reason), final=True)

    @property
    def pending_deliveries(self) -> int:
        """Tracked messages sent and not yet acknowledged by the peer."""
        return 0 if self._tracker is None else len(self._tracker)

    def try_send_lossy(self, data: bytes) -> bool:
        """Send unless congested; a dropped message is counted and False returned."""
        self._check_open()
        if self.channel.bufferedAmount > LOSSY_HIGH_WATER:
            self._counters.inc("packets.lossy_dropped")
            return False
        self.channel.send(data)
        return True
