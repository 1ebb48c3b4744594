"""Bad input on the data channels never crashes the participant: it is logged and counted."""

from __future__ import annotations

from livekit.protocol import models

from bridge.room.events import DataReceived
from bridge.room.room import Room
from bridge.room.types import DataPacketKind

RELIABLE = DataPacketKind.KIND_RELIABLE


def _user(seq: int, sid: str = "PA_x", payload: bytes = b"p") -> bytes:
    packet = models.DataPacket(
        user=models.UserPacket(payload=payload),
        participant_identity="alice",
        participant_sid=sid,
        sequence=seq,
    )
    return packet.SerializeToString()


def test_garbage_text_and_unknown_kinds_are_counted_not_raised() -> None:
    room = Room()
    room._on_message("_reliable", RELIABLE, b"\xff\xff\xff\xff garbage")
    room._on_message("_reliable", RELIABLE, "a text frame")
    # Field 99: a packet kind newer than our stubs (parses, but no known `value`).
    room._on_message("_reliable", RELIABLE, b"\x9a\x06\x03abc")
    # A kind we parse but do not handle.
    dtmf = models.DataPacket(sip_dtmf=models.SipDTMF(code=1, digit="1")).SerializeToString()
    room._on_message("_lossy", DataPacketKind.KIND_LOSSY, dtmf)
    assert room.counters["packets.malformed"] == 2
    assert room.counters["packets.unknown_kind"] == 1
    assert room.counters["packets.unhandled.sip_dtmf"] == 1
    assert room._event_inbox.empty()


def test_reliable_duplicates_are_dropped_by_sender_sequence() -> None:
    room = Room()
    for seq in (1, 2, 2, 1, 3):
        room._on_message("_reliable", RELIABLE, _user(seq))
    room._on_message("_reliable", RELIABLE, _user(1, sid="PA_other"))  # another sender
    assert room.counters["packets.duplicate"] == 2
    events = []
    while not room._event_inbox.empty():
        events.append(room._event_inbox.get_nowait())
    assert [e.packet.participant_sid for e in events if isinstance(e, DataReceived)] == [
        "PA_x", "PA_x", "PA_x", "PA_other",
    ]  # fmt: skip


def test_a_full_event_queue_drops_and_counts() -> None:
    from bridge.room.room import RoomOptions

    room = Room(RoomOptions(event_queue_size=2))
    for seq in range(1, 6):
        room._on_message("_reliable", RELIABLE, _user(seq))
    assert room._event_inbox.qsize() == 2
    assert room.counters["events.dropped"] == 3


def test_oversized_stream_and_rpc_inboxes_drop_and_count() -> None:
    from bridge.room.room import RoomOptions

    room = Room(RoomOptions(stream_queue_size=1, rpc_queue_size=1))
    chunk = models.DataPacket(
        stream_chunk=models.DataStream.Chunk(stream_id="s", chunk_index=0, content=b"x")
    ).SerializeToString()
    ack = models.DataPacket(rpc_ack=models.RpcAck(request_id="r")).SerializeToString()
    for _ in range(3):
        room._on_message("_reliable", RELIABLE, chunk)
        room._on_message("_reliable", RELIABLE, ack)
    assert room.counters["streams.inbox_dropped"] == 2
    assert room.counters["rpc.inbox_dropped"] == 2
