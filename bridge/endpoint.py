"""The seams every side of the bridge implements: `Source` and `Sink`.

A source yields `Inbound` messages and redelivers whatever is not acknowledged (after a restart
or reconnect); a sink's `publish` returns only once the far side accepted the message (Kafka
ack, MQTT PUBACK, LiveKit data channel below its high-water mark). Awaiting `publish` is the
backpressure. Both start and stop idempotently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from bridge.envelope import Inbound, Outbound


class Source(Protocol):
    """Something messages come from."""

    name: str

    def messages(self) -> AsyncIterator[Inbound]:
        """Inbound messages, in source order (per partition / topic), until stopped."""
        ...


class Sink(Protocol):
    """Something messages go to."""

    name: str

    async def publish(self, message: Outbound) -> None:
        """Publish `message`; return once the far side accepted it, raise otherwise."""
        ...
