"""Rejected messages: the route's ``on_reject`` decision, made once, and dead-letter publishing.

A message that can never go along its route (bad payload or template value, too large,
refused by LiveKit or the broker) is decided on exactly once:

* ``dead_letter``: published to the route's dead-letter destination with the original payload
  and ``roombus-error`` / ``roombus-error-detail`` / ``roombus-origin-topic`` headers, then
  acknowledged upstream. If even that fails (the dead-letter topic refuses it), it is nacked.
* ``drop``: counted, logged, and nacked upstream (MQTT 5 PUBACK with a failure reason code,
  Kafka commit past it).
* ``hold``: counted, logged, and never acknowledged: the bus keeps it and redelivers it after a
  reconnect — at the price of withholding every later acknowledgement of its MQTT connection or
  Kafka partition.

Every outcome is counted per route and reason (``route.<name>.rejected.<reason>``, then
``.dead_lettered`` / ``.dropped`` / ``.held``), and logged at WARNING at most once per route and
reason every `LOG_EVERY` seconds, with the number of messages the quiet period swallowed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from bridge.endpoint import Sink
from bridge.envelope import Outbound
from bridge.errors import RejectedMessage
from bridge.logs import RateLimitedLog
from bridge.room.types import Counters
from bridge.router import BusTarget
from bridge.runtime.publisher import Publisher

log = logging.getLogger("roombus.reject")

LOG_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class Rejected:
    """What a rejected message carries into its dead-letter copy."""

    payload: bytes | None
    values: Mapping[str, str]
    headers: Mapping[str, str]
    content_type: str | None
    default_key: str | None
    origin: str  # where it came from, for the log: a topic, or a room and participant


class Rejections:
    """Applies a route's ``on_reject`` policy (see the module docstring)."""

    def __init__(
        self,
        sinks: Mapping[str, Sink[Outbound]],
        publisher: Publisher,
        counters: Counters,
        bridge_id: str,
    ) -> None:
        self.sinks = sinks
        self.publisher = publisher
        self.counters = counters
        self.bridge_id = bridge_id
        self._warnings = RateLimitedLog(log, LOG_EVERY)  # keyed by (route, reason)

    async def decide(
        self,
        route: str,
        policy: str,
        dead_letter: BusTarget | None,
        why: RejectedMessage,
        message: Rejected,
    ) -> tuple[bool, RejectedMessage | None]:
        """Apply `policy` to a rejected message.

        Returns:
            (settle, error): whether to acknowledge the message upstream now, and with which
            error (None: a plain ack, because the dead-letter destination has it).
        """
        prefix = f"route.{route}"
        self.counters.inc(f"{prefix}.rejected.{why.reason}")
        self.counters.note_error(route, f"rejected: {why.reason}: {why.detail[:200]}")
        if policy == "hold":
            self.counters.inc(f"{prefix}.held")
            self._warn(route, why, message, "held (not acknowledged)")
            return False, None
        if policy == "dead_letter" and dead_letter is not None:
            if await self.send(route, dead_letter, why, message):
                self.counters.inc(f"{prefix}.dead_lettered")
                self._warn(route, why, message, "dead-lettered")
                return True, None
            self.counters.inc(f"{prefix}.dead_letter_failed")
        self.counters.inc(f"{prefix}.dropped.{why.reason}")
        self._warn(route, why, message, "dropped")
        return True, why

    async def send(
        self, route: str, target: BusTarget, why: RejectedMessage, message: Rejected
    ) -> bool:
        """Publish the dead-letter copy of `message`; False if that is impossible too."""
        headers = dict(message.headers) | {
            "roombus-error": why.reason,
            "roombus-error-detail": why.detail[:500],
            "roombus-origin-topic": message.origin,
        }
        try:
            out = target.outbound(
                message.payload,
                message.values,
                headers,
                content_type=message.content_type,
                default_key=message.default_key,
                bridge_id=self.bridge_id,
            )
            await self.publisher.publish(
                self.sinks[target.endpoint], out, route=route, where=out.topic
            )
        except RejectedMessage as exc:
            log.error("%s: cannot dead-letter a message either: %s", route, exc)
            return False
        return True

    def _warn(self, route: str, why: RejectedMessage, message: Rejected, outcome: str) -> None:
        self._warnings.warning(
            (route, why.reason),
            "%s: rejected a message from %s: %s: %s; %s",
            route,
            message.origin,
            why.reason,
            why.detail,
            outcome,
            extra={"route": route},
        )
