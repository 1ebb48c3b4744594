"""Fuzzers for what reads untrusted input: data packets, room state, stream reassembly,
topic templates and filters, and the configuration loader.

Each property is the contract the rest of the bridge relies on: malformed input is refused the
documented way (None and a count, `ConfigError`, `TemplateError`/`TemplateValueError`) and never
raises anything else, hangs, or breaks a limit.
"""

from __future__ import annotations

import asyncio
import string
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from livekit.protocol import models

from bridge.config import ConfigError, parse_config
from bridge.room import packets
from bridge.room.state import RoomState
from bridge.room.streams import ByteStreamReader, TextStreamReader
from bridge.room.types import Counters
from bridge.topics import (
    Target,
    TemplateError,
    TemplateValueError,
    glob_match,
    parse_filter,
    parse_template,
)
from tests.fuzz.conftest import FUZZ, corpus
from tests.unit.test_streams import Pair, chunk, header, trailer

ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- packets


def _decode_is_total(data: bytes) -> None:
    counters = Counters()
    packet = packets.decode(data, "fuzz", counters)
    if packet is None:
        assert counters["packets.malformed"] == 1
    else:
        assert isinstance(packet, models.DataPacket)


@FUZZ
@given(st.binary(max_size=2048))
def test_packet_decode_never_raises(data: bytes) -> None:
    _decode_is_total(data)


@pytest.mark.parametrize("path", corpus("packets"), ids=lambda p: p.name)
def test_packet_corpus(path: Path) -> None:
    _decode_is_total(path.read_bytes())


@FUZZ
@given(
    payload=st.binary(max_size=4096),
    topic=st.text(max_size=64),
    destinations=st.lists(st.text(min_size=1, max_size=16), max_size=4),
)
def test_user_packet_round_trip(payload: bytes, topic: str, destinations: list[str]) -> None:
    sent = packets.user_packet(payload, topic=topic, destination_identities=destinations)
    got = packets.decode(packets.encode(sent), "fuzz", Counters())
    assert got is not None
    assert (got.user.payload, got.user.topic, list(got.destination_identities)) == (
        payload,
        topic,
        destinations,
    )


# ----------------------------------------------------------------------------- room state

_IDENTITIES = st.sampled_from(["a", "b", "c", "bridge", ""])
_SIDS = st.sampled_from(["PA_1", "PA_2", "PA_3", "PA_4", ""])


@st.composite
def _participant(draw: st.DrawFn) -> models.ParticipantInfo:
    return models.ParticipantInfo(
        sid=draw(_SIDS),
        identity=draw(_IDENTITIES),
        state=cast(Any, draw(st.sampled_from([0, 1, 2, 3]))),  # any wire value
        version=draw(st.integers(0, 5)),
        metadata=draw(st.text(max_size=8)),
        attributes=draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)),
        kind=cast(Any, draw(st.integers(0, 7))),  # kinds beyond the known ones too
    )


@FUZZ
@given(
    join=st.lists(_participant(), max_size=4),
    updates=st.lists(st.lists(_participant(), max_size=3), max_size=8),
    rejoin=st.lists(_participant(), max_size=4),
)
def test_room_state_takes_any_update_sequence(
    join: list[models.ParticipantInfo],
    updates: list[list[models.ParticipantInfo]],
    rejoin: list[models.ParticipantInfo],
) -> None:
    state = RoomState(counters=Counters())

    def response(others: list[models.ParticipantInfo]) -> object:
        from livekit.protocol import rtc

        return rtc.JoinResponse(
            room=models.Room(name="r", sid="RM_1"),
            participant=models.ParticipantInfo(sid="PA_me", identity="bridge"),
            other_participants=others,
        )

    state.reset(response(join))  # type: ignore[arg-type]
    for batch in updates:
        state.apply_participant_update(batch)
        # The invariant the rest of the bridge relies on: one record per identity, never us.
        remote = state.remote_participants
        assert "bridge" not in remote
        assert all(info.identity == identity and info.sid for identity, info in remote.items())
    state.reset(response(rejoin))  # type: ignore[arg-type]
    assert "bridge" not in state.remote_participants


# ----------------------------------------------------------------------------- streams

_STREAM_IDS = st.sampled_from(["s1", "s2", "s3"])


@st.composite
def _stream_packet(draw: st.DrawFn) -> models.DataPacket:
    sid = draw(_STREAM_IDS)
    which = draw(st.sampled_from(["header", "chunk", "chunk", "chunk", "trailer"]))
    if which == "header":
        return header(
            sid,
            text=draw(st.booleans()),
            total=draw(st.none() | st.integers(0, 4096)),
            compression=draw(st.sampled_from([0, 0, 1, 7])),
            inline=draw(st.none() | st.binary(max_size=64)),
        )
    if which == "chunk":
        return chunk(sid, draw(st.integers(0, 6)), draw(st.binary(max_size=512)))
    return trailer(sid, draw(st.sampled_from(["", "aborted"])))


@FUZZ
@given(st.lists(_stream_packet(), max_size=40))
def test_stream_reassembly_takes_any_packet_sequence(sequence: list[models.DataPacket]) -> None:
    asyncio.run(_reassemble(sequence))


async def _reassemble(sequence: list[models.DataPacket]) -> None:
    pair = Pair(max_buffered_bytes_per_stream=64 * 1024, stall_timeout=None)
    readers: list[asyncio.Task[object]] = []

    async def drain(reader: TextStreamReader | ByteStreamReader) -> object:
        if isinstance(reader, TextStreamReader):
            return await reader.read_all()
        return b"".join([piece async for piece in reader])

    def on_stream(reader: TextStreamReader | ByteStreamReader, _sender: str) -> None:
        readers.append(asyncio.ensure_future(drain(reader)))

    pair.bob.register_text_stream_handler("chat", on_stream)
    pair.bob.register_byte_stream_handler("chat", on_stream)
    async with asyncio.timeout(30):  # bounded: a reader that never ends would be a bug here
        for packet in sequence:
            await pair.bob.on_packet(packet)
        # Whatever is still open ends with the sender: readers finish (or raise), never hang.
        pair.bob.abort_all("fuzz: sender gone")
        results = await asyncio.gather(*readers, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            assert not isinstance(result, (AssertionError, TypeError, AttributeError, KeyError))


# ----------------------------------------------------------------------------- topics

_TEXT = st.text(alphabet=string.printable + "é€😀{}$+#/", max_size=40)


@FUZZ
@given(text=_TEXT, values=st.dictionaries(st.sampled_from(["a", "b", "room"]), _TEXT, max_size=3))
def test_templates_render_or_refuse(text: str, values: dict[str, str]) -> None:
    for target in Target:
        try:
            template = parse_template(text, ("a", "b", "room"), target)
        except TemplateError:
            continue
        full = {"a": "", "b": "", "room": ""} | values
        try:
            rendered = template.render(full, target)
        except TemplateValueError:
            continue
        assert isinstance(rendered, str)
        if target is Target.MQTT_TOPIC:
            # A value can never add a wildcard or a topic level the template did not have.
            assert "+" not in rendered.replace(_literal(template), "") or "+" in text
            assert rendered.count("/") == _literal(template).count("/")


def _literal(template: object) -> str:
    parts = getattr(template, "parts", ())
    return "".join(p for p in parts if isinstance(p, str))


@FUZZ
@given(text=_TEXT, topic=_TEXT)
def test_topic_filters_parse_or_refuse_and_match_safely(text: str, topic: str) -> None:
    try:
        topic_filter = parse_filter(text)
    except TemplateError:
        return
    captured = topic_filter.match(topic)
    assert captured is None or isinstance(captured, dict)
    glob_match(text, topic)  # any pattern is a valid glob: it never raises


# ----------------------------------------------------------------------------- config

_EXAMPLE = (ROOT / "config.example.yaml").read_text()


def _loads_or_refuses(text: str) -> None:
    try:
        parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@pytest.mark.parametrize("path", corpus("config"), ids=lambda p: p.name)
def test_config_corpus(path: Path) -> None:
    _loads_or_refuses(path.read_bytes().decode("utf-8", "replace"))


@FUZZ
@given(st.text(max_size=400))
def test_config_loader_takes_any_text(text: str) -> None:
    _loads_or_refuses(text)


@FUZZ
@given(cut=st.integers(0, len(_EXAMPLE)), insert=st.text(max_size=12), drop=st.integers(0, 20))
def test_config_loader_takes_any_edit_of_the_example(cut: int, insert: str, drop: int) -> None:
    _loads_or_refuses(_EXAMPLE[:cut] + insert + _EXAMPLE[cut + drop :])


def _info(sid: str, identity: str) -> models.ParticipantInfo:
    return models.ParticipantInfo(sid=sid, identity=identity)


@pytest.mark.parametrize(
    ("join", "updates"),
    [
        # Found by the fuzzer: an old session of ours, and a sid under two identities, listed
        # in a join response.
        ([_info("PA_1", "a"), _info("PA_1", "bridge")], []),
        ([_info("PA_1", "a"), _info("PA_1", "b")], []),
        # Found by the fuzzer: an update giving a held sid to another identity, then the first
        # identity under a new sid (KeyError).
        (
            [],
            [[_info("PA_1", "a"), _info("PA_1", "b")], [_info("PA_2", "a")], [_info("PA_2", "b")]],
        ),
    ],
)
def test_room_state_regressions(
    join: list[models.ParticipantInfo], updates: list[list[models.ParticipantInfo]]
) -> None:
    from livekit.protocol import rtc

    state = RoomState(counters=Counters())
    state.reset(
        rtc.JoinResponse(
            room=models.Room(name="r", sid="RM_1"),
            participant=models.ParticipantInfo(sid="PA_me", identity="bridge"),
            other_participants=join,
        )
    )
    for batch in updates:
        state.apply_participant_update(batch)
    remote = state.remote_participants
    assert "bridge" not in remote
    sids = [info.sid for info in remote.values()]
    assert len(sids) == len(set(sids)), remote
