"""State for late joiners: the last value per bus topic of latched routes, replayed on join.

A bus-to-room route with ``latched: true`` (packet targets) keeps, per room, the last payload
delivered for each bus topic — the MQTT topic, or the Kafka topic and record key — so retained
MQTT messages and compacted Kafka topics fill it naturally. An empty payload (a cleared retained
topic, a tombstone) forgets the topic's value. The store is bounded by ``max_keys`` per route:
the least recently updated topic is evicted (``route.<name>.latched_evicted``).

`Latch.keep` is called after a successful delivery (`bridge.runtime.room_sink`): a value the
room never had is never replayed. When a participant joins a room (`attach` listens for
`ParticipantConnected` on every session of every room), a task waits until livekit-server
reports the participant ACTIVE (before that the server drops data addressed to it; at most
`ACTIVE_WAIT` seconds), then sends it each latched value of that room as a packet addressed
to its identity only (a value whose route has `destinations` only to those identities),
counted ``route.<name>.latched_sent`` once livekit-server has it. Participants already in the
room had the values live; a rejoin of the bridge replays them to those who joined meanwhile.
The replay tasks end with the room's session (a send to a closed session fails at once).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from livekit.protocol import models

from bridge.config import ConnectorConfig
from bridge.envelope import Envelope
from bridge.room.errors import DataPacketTooLargeError, RoomError
from bridge.room.room import Room
from bridge.room.state import ParticipantConnected
from bridge.room.types import Counters
from bridge.router import RoomDelivery
from bridge.runtime.room_link import RoomLink

log = logging.getLogger("roombus.latch")

# How long a replay waits for a joiner to become ACTIVE, and how often it looks.
ACTIVE_WAIT = 10.0
ACTIVE_POLL = 0.05
_ACTIVE = models.ParticipantInfo.State.ACTIVE


@dataclass(frozen=True, slots=True)
class _Value:
    payload: bytes
    topic: str | None
    reliable: bool
    destinations: tuple[str, ...]
    oversize_as_stream: bool


class _Store:
    """One route's latched values: (room, bus topic, Kafka key) -> value, oldest first."""

    __slots__ = ("max_keys", "values")

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.values: collections.OrderedDict[tuple[str, str, bytes | None], _Value] = (
            collections.OrderedDict()
        )


class Latch:
    """The latched values of every latched route (see the module docstring)."""

    def __init__(self, connectors: Iterable[ConnectorConfig], counters: Counters) -> None:
        self.counters = counters
        self._stores: dict[str, _Store] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.configure(connectors)

    def configure(self, connectors: Iterable[ConnectorConfig]) -> None:
        """Latch the routes of `connectors` that ask for it (a reload keeps what still applies)."""
        stores: dict[str, _Store] = {}
        for connector in connectors:
            settings = connector.latch
            if settings is None:
                continue
            store = self._stores.get(connector.name) or _Store(settings.max_keys)
            store.max_keys = settings.max_keys
            self._trim(connector.name, store)
            stores[connector.name] = store
        self._stores = stores

    def __len__(self) -> int:
        return sum(len(s.values) for s in self._stores.values())

    def keep(self, route: str, d: RoomDelivery, envelope: Envelope) -> None:
        """Remember `d` (delivered along `route`) as its bus topic's last value.

        Only what was delivered is kept, so a route's allow/deny rules (which need destination
        identities on bus-to-room routes) were already applied, and a replay goes only to the
        value's destinations.
        """
        store = self._stores.get(route)
        if store is None or d.kind != "packet":
            return
        key = (d.room, envelope.topic, envelope.key)
        if not d.payload:
            store.values.pop(key, None)
            return
        store.values[key] = _Value(
            d.payload, d.topic, d.reliable, d.destinations, d.oversize_as_stream
        )
        store.values.move_to_end(key)
        if len(store.values) > store.max_keys:
            self._trim(route, store)

    def _trim(self, route: str, store: _Store) -> None:
        while len(store.values) > store.max_keys:
            store.values.popitem(last=False)
            self.counters.inc(f"route.{route}.latched_evicted")

    # ------------------------------------------------------------------ replay

    def attach(self, link: RoomLink, room: Room) -> None:
        """Replay to the participants that join `room` (a link's new session)."""
        name = link.name

        def joined(event: ParticipantConnected) -> None:
            if not self._stores:
                return
            task = asyncio.get_running_loop().create_task(
                self._replay(name, room, event.info.identity),
                name=f"roombus[latch:{name}:{event.info.identity}]",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        room.on(ParticipantConnected, joined)

    async def _replay(self, room_name: str, room: Room, identity: str) -> None:
        waited = 0.0
        while True:
            if not room.isconnected:
                return
            info = room.participant_info(identity)
            if info is None:
                return  # left again
            if info.state == _ACTIVE:
                break
            if waited >= ACTIVE_WAIT:
                break  # send anyway: what the server drops is what it would have dropped live
            await asyncio.sleep(ACTIVE_POLL)
            waited += ACTIVE_POLL
        lp = room.local_participant
        for route, store in list(self._stores.items()):
            values = [
                v
                for (room_key, _, _), v in store.values.items()
                if room_key == room_name and (not v.destinations or identity in v.destinations)
            ]
            sent = 0
            try:
                for v in values:
                    try:
                        await lp.publish_data(
                            v.payload,
                            reliable=v.reliable,
                            destination_identities=[identity],
                            topic=v.topic,
                            wait_delivered=True,
                        )
                    except DataPacketTooLargeError:
                        if not v.oversize_as_stream:
                            continue
                        await lp.send_bytes(
                            v.payload,
                            name=v.topic or "message",
                            topic=v.topic or "",
                            destination_identities=[identity],
                            wait_delivered=True,
                        )
                    sent += 1
            except RoomError as exc:
                self.counters.inc(f"route.{route}.latched_failed")
                log.info("room %s: latched values for %s not sent: %s", room_name, identity, exc)
                return
            finally:
                if sent:
                    self.counters.inc(f"route.{route}.latched_sent", sent)
