"""Room events as data (`events` routes): what happens in a room, as JSON messages in order on
the bus — the room started, an SDK participant joining, publishing and unpublishing an audio
track, leaving, and the room deleted through the server API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from livekit import api, rtc

from tests.e2e.conftest import KafkaPeer, MqttPeer, bridge_yaml, run_bridge, unique
from tests.interop.conftest import eventually, sdk_peer
from tests.services import Kafka, LiveKitServer, Mosquitto

# Next event body from the bus.
Next = Callable[[], Awaitable[dict[str, Any]]]


async def _delete_room(livekit: LiveKitServer, room: str) -> None:
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        await lkapi.room.delete_room(api.DeleteRoomRequest(room=room))


async def _life_of_a_room(livekit: LiveKitServer, room: str, next_event: Next) -> list[Any]:
    """alice joins, publishes a microphone track, unpublishes it and leaves, then the room is
    deleted; each step waits for the event of the one before. Returns the events, and alice's
    participant and track sids."""
    events = [await next_event()]  # room_started: the bridge joined
    async with sdk_peer(livekit, room, "alice", name="Alice") as alice:
        events.append(await next_event())
        source = rtc.AudioSource(48000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("mic", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        publication = await alice.local_participant.publish_track(track, options)
        events.append(await next_event())
        await alice.local_participant.unpublish_track(publication.sid)
        events.append(await next_event())
        sids = (alice.local_participant.sid, publication.sid)
    events.append(await next_event())
    await _delete_room(livekit, room)
    events.append(await next_event())
    return [events, sids]


def _check(events: list[dict[str, Any]], room: str, alice_sid: str, track_sid: str) -> None:
    assert [e["event"] for e in events] == [
        "room_started",
        "participant_joined",
        "track_published",
        "track_unpublished",
        "participant_left",
        "room_finished",
    ]
    room_sid = events[0]["room_sid"]
    assert room_sid.startswith("RM_")
    for event in events:
        assert event["room"] == room and event["room_sid"] == room_sid
        assert isinstance(event["time"], int) and event["time"] > 1_600_000_000_000
    started, joined, published, unpublished, left, finished = events
    assert set(started) == {"event", "room", "room_sid", "time"}
    alice = {"identity": "alice", "sid": alice_sid, "name": "Alice", "kind": "standard"}
    for event in (joined, published, unpublished, left):
        assert event["participant"] == alice
    track = {
        "sid": track_sid,
        "name": "mic",
        "type": "audio",
        "source": "microphone",
        "muted": False,
    }
    assert published["track"] == track
    assert unpublished["track"]["sid"] == track_sid
    assert "track" not in joined and "track" not in left
    assert left["reason"] == "CLIENT_INITIATED"
    assert finished["reason"] == "ROOM_DELETED"
    assert "participant" not in finished


async def test_a_rooms_life_reaches_kafka_in_order_keyed_by_room(
    livekit_server: LiveKitServer, kafka: Kafka, kafka_peer: KafkaPeer, room_name: str
) -> None:
    topic = unique("room-events")
    await kafka_peer.create_topic(topic)
    consumer = await kafka_peer.consumer(topic)
    records = []

    async def next_event() -> dict[str, Any]:
        record = await asyncio.wait_for(consumer.getone(), 30)
        records.append(record)
        body = json.loads(record.value)
        assert isinstance(body, dict)
        return body

    config = bridge_yaml(
        livekit_server,
        None,
        kafka,
        room_name,
        f"""\
connectors:
  - name: room-events
    from: {{room: "*", events: {{}}}}
    to: {{kafka: main, topic: {topic}}}
""",
    )
    async with run_bridge(config) as bridge:
        events, (alice_sid, track_sid) = await _life_of_a_room(
            livekit_server, room_name, next_event
        )
        _check(events, room_name, alice_sid, track_sid)
        assert {r.key for r in records} == {room_name.encode()}  # one room: one partition
        for record in records:
            headers = dict(record.headers)
            assert headers["content-type"] == b"application/json"
            assert headers["lk-kind"] == b"room-event"
            assert headers["lk-room"] == room_name.encode()
        assert dict(records[2].headers)["lk-participant"] == b"alice"
        # The consumer may see the last record before the bridge counted its acknowledgement.
        await eventually(
            lambda: bridge.counters["route.room-events.published"] >= 6,
            what="six room events counted as published",
        )


async def test_chosen_kinds_to_mqtt_with_event_placeholders(
    livekit_server: LiveKitServer, mosquitto: Mosquitto, mqtt_peer: MqttPeer, room_name: str
) -> None:
    """Only the kinds listed, to topics made of the event's placeholders."""
    await mqtt_peer.subscribe(f"events/{room_name}/#")
    config = bridge_yaml(
        livekit_server,
        mosquitto,
        None,
        room_name,
        f"""\
connectors:
  - name: tracks
    from: {{room: "{room_name}", events: {{kinds: [track_published, track_unpublished]}}}}
    to: {{mqtt: bus, topic: "events/{{room}}/{{participant_kind}}/{{participant}}/{{event}}"}}
    where: participant_kind == "standard"
""",
    )

    async def next_message() -> tuple[str, dict[str, Any]]:
        message = await mqtt_peer.next(30)
        body = json.loads(message.payload)
        assert isinstance(body, dict)
        return message.topic, body

    async with (
        run_bridge(config),
        sdk_peer(livekit_server, room_name, "bob") as bob,
    ):
        await eventually(lambda: "bridge" in bob.remote_participants, what="the bridge")
        source = rtc.AudioSource(48000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("voice", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        publication = await bob.local_participant.publish_track(track, options)
        topic, body = await next_message()
        assert topic == f"events/{room_name}/standard/bob/track_published"
        assert body["track"]["sid"] == publication.sid and body["track"]["name"] == "voice"
        await bob.local_participant.unpublish_track(publication.sid)
        topic, body = await next_message()
        assert topic == f"events/{room_name}/standard/bob/track_unpublished"
        assert body["event"] == "track_unpublished"
    assert mqtt_peer.messages.empty()  # no room or participant events on this route
