"""DataPacket encoding, size guard and receive-side de-duplication.

Every packet we send is checked against `MAX_DATA_PACKET_BYTES` *after* encoding: the server
closes a data channel on a larger message without telling the sender, so an oversized packet is
refused here with `DataPacketTooLargeError` and never leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from google.protobuf.message import DecodeError
from livekit.protocol import models

from bridge.room.errors import DataPacketTooLargeError
from bridge.room.types import MAX_DATA_PACKET_BYTES, Counters, DataPacket, DataPacketKind

log = logging.getLogger("roombus.room.packets")


def user_packet(
    payload: bytes, *, topic: str | None = None, destination_identities: Sequence[str] = ()
) -> models.DataPacket:
    """A `user` DataPacket carrying `payload`."""
    user = models.UserPacket(payload=payload)
    if topic:
        user.topic = topic
    return models.DataPacket(user=user, destination_identities=list(destination_identities))


def encode(packet: models.DataPacket) -> bytes:
    """Serialize `packet`, refusing anything over the channel limit."""
    data = packet.SerializeToString()
    if len(data) > MAX_DATA_PACKET_BYTES:
        what = f"{packet.WhichOneof('value') or 'empty'} data packet"
        raise DataPacketTooLargeError(len(data), MAX_DATA_PACKET_BYTES, what)
    return data


def decode(data: bytes | str, channel: str, counters: Counters) -> models.DataPacket | None:
    """Parse a message from a data channel; None (logged, counted) if it is not a DataPacket."""
    if isinstance(data, str):
        counters.inc("packets.malformed")
        log.warning("packets: dropped a text message on %s (LiveKit sends binary)", channel)
        return None
    packet = models.DataPacket()
    try:
        packet.ParseFromString(data)
    except DecodeError as exc:
        counters.inc("packets.malformed")
        log.warning(
            "packets: dropped a malformed packet (%d bytes) on %s: %s", len(data), channel, exc
        )
        return None
    return packet


def received_user_packet(
    packet: models.DataPacket, kind: DataPacketKind, encrypted: bool = False
) -> DataPacket:
    """Our `DataPacket` view of a received `user` packet.

    `encrypted`: it came end-to-end encrypted (see `bridge.room.e2ee`).
    """
    user = packet.user
    return DataPacket(
        data=user.payload,
        kind=kind,
        participant_identity=packet.participant_identity,
        participant_sid=packet.participant_sid,
        topic=user.topic if user.HasField("topic") else None,
        destination_identities=tuple(packet.destination_identities),
        encrypted=encrypted,
    )


class ReceiveDeduper:
    """Drops reliable packets already seen from the same sender session.

    Reliable packets carry a per-session sequence number (from 1); the server may replay
    cached packets, so one at or below the last seen from that participant sid is a duplicate.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def is_duplicate(self, packet: models.DataPacket) -> bool:
        """Record `packet` and tell whether it was seen before."""
        seq, sid = packet.sequence, packet.participant_sid
        if seq == 0 or not sid:
            return False
        if seq <= self._last.get(sid, 0):
            return True
        self._last[sid] = seq
        return False

    def forget(self, sid: str) -> None:
        """Drop the state of a participant that left (bounds memory to the room's size)."""
        self._last.pop(sid, None)

    def clear(self) -> None:
        """Forget everything (a new session)."""
        self._last.clear()
