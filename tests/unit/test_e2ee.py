"""E2EE of data packets (`bridge.room.e2ee`): key derivation, sealing and opening, the room's
rejection of what it cannot decrypt, and the `livekit.e2ee` configuration.

The derivation is checked against an independent implementation of the parameters read in
the SDKs' sources (hashlib's PBKDF2, HKDF written out from RFC 5869 with hmac) and against
frozen vectors; the vectors are what the Python SDK 1.2.1 derives too, since
`tests/interop/test_e2ee.py` exchanges packets with it under the same keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

import pytest
from livekit.protocol import models, rtc

from bridge.config import ConfigError, parse_config
from bridge.room.e2ee import (
    ENCRYPTABLE,
    IV_BYTES,
    TAG_BYTES,
    DataCryptor,
    DecryptError,
    derive_key,
)
from bridge.room.events import DataReceived
from bridge.room.room import Room, RoomOptions
from bridge.room.types import DataPacketKind

KEY = b"roombus-e2ee-interop-shared-key"
SALT = b"LKFrameEncryptionKey"


def _hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def test_pbkdf2_is_sha256_100000_iterations_16_bytes_salted_with_the_ratchet_salt() -> None:
    expected = hashlib.pbkdf2_hmac("sha256", KEY, SALT, 100_000, 16)
    assert derive_key(KEY) == expected
    assert expected.hex() == "98ab82c30abbf3f3779287bf98f5c8b3"


def test_hkdf_is_sha256_with_128_zero_bytes_of_info() -> None:
    assert derive_key(KEY, key_derivation="hkdf") == _hkdf_sha256(KEY, SALT, bytes(128), 16)
    assert derive_key(KEY, key_derivation="hkdf").hex() == "eacbdc1005178757fea30e449ccafd22"
    salted = derive_key(KEY, salt=b"our-own-salt", key_derivation="hkdf")
    assert salted.hex() == "ace4d6c07f074c8f198e7ccfb0b8d5d8"


def test_unknown_derivation_and_empty_key_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown key derivation"):
        derive_key(KEY, key_derivation="scrypt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        DataCryptor(b"")


def test_encrypt_is_aes_128_gcm_without_associated_data() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    cryptor = DataCryptor(KEY)
    iv, ciphertext = cryptor.encrypt(b"hello")
    assert len(iv) == IV_BYTES and len(ciphertext) == 5 + TAG_BYTES
    assert AESGCM(derive_key(KEY)).decrypt(iv, ciphertext, None) == b"hello"
    assert cryptor.decrypt(iv, ciphertext) == b"hello"
    assert cryptor.encrypt(b"hello")[0] != iv  # a fresh IV every time


def _user(payload: bytes = b"hi") -> models.DataPacket:
    return models.DataPacket(
        kind=models.DataPacket.Kind.RELIABLE,
        participant_identity="alice",
        participant_sid="PA_1",
        destination_identities=["bob", "carol"],
        sequence=7,
        user=models.UserPacket(payload=payload, topic="t"),
    )


def test_seal_keeps_the_routing_fields_clear_and_open_restores_the_packet() -> None:
    cryptor = DataCryptor(KEY)
    packet = _user()
    sealed = cryptor.seal(packet)
    assert sealed.WhichOneof("value") == "encrypted_packet"
    assert sealed.encrypted_packet.encryption_type == models.Encryption.Type.GCM
    assert sealed.encrypted_packet.key_index == 0
    assert len(sealed.encrypted_packet.iv) == IV_BYTES
    assert b"hi" not in sealed.SerializeToString()
    assert list(sealed.destination_identities) == ["bob", "carol"]
    assert (sealed.participant_identity, sealed.participant_sid, sealed.sequence) == (
        "alice",
        "PA_1",
        7,
    )
    # What is inside is an EncryptedPacketPayload with the same case.
    inner = models.EncryptedPacketPayload()
    inner.ParseFromString(
        cryptor.decrypt(sealed.encrypted_packet.iv, sealed.encrypted_packet.encrypted_value)
    )
    assert inner.user == packet.user
    assert cryptor.open(sealed) == packet


@pytest.mark.parametrize(
    "value",
    [
        models.DataPacket(stream_header=models.DataStream.Header(stream_id="s", topic="chat")),
        models.DataPacket(stream_chunk=models.DataStream.Chunk(stream_id="s", content=b"x")),
        models.DataPacket(stream_trailer=models.DataStream.Trailer(stream_id="s")),
        models.DataPacket(rpc_request=models.RpcRequest(id="r", method="m", payload="p")),
        models.DataPacket(rpc_ack=models.RpcAck(request_id="r")),
        models.DataPacket(rpc_response=models.RpcResponse(request_id="r", payload="ok")),
        models.DataPacket(chat_message=models.ChatMessage(id="c", message="hey")),
    ],
    ids=lambda p: p.WhichOneof("value"),
)
def test_every_encryptable_case_round_trips(value: models.DataPacket) -> None:
    cryptor = DataCryptor(KEY)
    sealed = cryptor.seal(value)
    assert sealed.WhichOneof("value") == "encrypted_packet"
    assert cryptor.open(sealed) == value


def test_the_cases_are_those_of_the_payload_message_and_others_stay_clear() -> None:
    expected = {
        "user", "chat_message", "rpc_request", "rpc_ack", "rpc_response",
        "stream_header", "stream_chunk", "stream_trailer",
    }  # fmt: skip
    assert expected == ENCRYPTABLE
    dtmf = models.DataPacket(sip_dtmf=models.SipDTMF(code=1, digit="1"))
    assert DataCryptor(KEY).seal(dtmf) is dtmf


def test_open_refuses_a_wrong_key_index_type_or_damage() -> None:
    cryptor = DataCryptor(KEY)
    sealed = cryptor.seal(_user())
    with pytest.raises(DecryptError, match="different key"):
        DataCryptor(b"another key").open(sealed)
    with pytest.raises(DecryptError, match="different key"):
        DataCryptor(KEY, key_derivation="hkdf").open(sealed)
    other_index = models.DataPacket()
    other_index.CopyFrom(sealed)
    other_index.encrypted_packet.key_index = 3
    with pytest.raises(DecryptError, match="key index 3"):
        cryptor.open(other_index)
    custom = models.DataPacket()
    custom.CopyFrom(sealed)
    custom.encrypted_packet.encryption_type = models.Encryption.Type.CUSTOM
    with pytest.raises(DecryptError, match="CUSTOM"):
        cryptor.open(custom)
    damaged = models.DataPacket()
    damaged.CopyFrom(sealed)
    damaged.encrypted_packet.encrypted_value = b"\x00" + sealed.encrypted_packet.encrypted_value[1:]
    with pytest.raises(DecryptError):
        cryptor.open(damaged)
    short_iv = models.DataPacket()
    short_iv.CopyFrom(sealed)
    short_iv.encrypted_packet.iv = b"\x00" * 8
    with pytest.raises(DecryptError, match="IV of 8 bytes"):
        cryptor.open(short_iv)
    iv, garbage = cryptor.encrypt(b"\xff\xff\xff")  # authentic, but no protobuf
    bad = models.DataPacket(
        encrypted_packet=models.EncryptedPacket(
            encryption_type=models.Encryption.Type.GCM, iv=iv, encrypted_value=garbage
        )
    )
    with pytest.raises(DecryptError, match="not an EncryptedPacketPayload"):
        cryptor.open(bad)


# ----------------------------------------------------------------------------- the room


@pytest.mark.parametrize("key", [None, b"wrong"], ids=["no_key", "wrong_key"])
async def test_a_room_rejects_what_it_cannot_decrypt_counts_it_and_logs_once(
    key: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    room = Room(RoomOptions(e2ee=DataCryptor(key) if key else None))
    sender = DataCryptor(KEY)
    with caplog.at_level(logging.WARNING, logger="roombus.room"):
        for seq in (1, 2, 3):
            packet = _user()
            packet.sequence = seq  # the same sequence again would be a duplicate
            sealed = sender.seal(packet).SerializeToString()
            room._on_message("_reliable", DataPacketKind.KIND_RELIABLE, sealed)
    assert room.counters["rejected.encrypted"] == 3
    assert room.counters["packets.received"] == 0
    assert room._event_inbox.empty()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "rejected.encrypted" in lines[0]


async def test_a_room_with_the_key_delivers_the_decrypted_packet() -> None:
    room = Room(RoomOptions(e2ee=DataCryptor(KEY)))
    sealed = DataCryptor(KEY).seal(_user(b"secret")).SerializeToString()
    room._on_message("_reliable", DataPacketKind.KIND_RELIABLE, sealed)
    event = room._event_inbox.get_nowait()
    assert isinstance(event, DataReceived)
    assert event.packet.data == b"secret" and event.packet.topic == "t"
    assert event.packet.participant_identity == "alice"
    assert event.packet.destination_identities == ("bob", "carol")
    assert event.packet.encrypted
    # Clear packets still arrive (as with the SDKs), marked as such.
    clear = _user(b"clear")
    clear.sequence = 8
    room._on_message("_reliable", DataPacketKind.KIND_RELIABLE, clear.SerializeToString())
    event = room._event_inbox.get_nowait()
    assert isinstance(event, DataReceived)
    assert event.packet.data == b"clear" and not event.packet.encrypted


def test_rpc_replies_to_a_caller_that_is_no_participant_stay_clear() -> None:
    room = Room(RoomOptions(e2ee=DataCryptor(KEY)))
    room._state.reset(
        rtc.JoinResponse(
            participant=models.ParticipantInfo(identity="ours", sid="PA_o"),
            other_participants=[models.ParticipantInfo(identity="alice", sid="PA_a")],
        )
    )
    cryptor = DataCryptor(KEY)

    def reply(to: list[str]) -> models.DataPacket:
        return models.DataPacket(destination_identities=to, rpc_ack=models.RpcAck(request_id="r"))

    # The server's random caller identity: it reads the reply itself.
    assert room._seal(cryptor, reply(["8c7e-uuid"])).WhichOneof("value") == "rpc_ack"
    assert room._seal(cryptor, reply(["alice"])).WhichOneof("value") == "encrypted_packet"
    assert room._seal(cryptor, reply([])).WhichOneof("value") == "encrypted_packet"
    request = models.DataPacket(
        destination_identities=["8c7e-uuid"], rpc_request=models.RpcRequest(id="r")
    )
    assert room._seal(cryptor, request).WhichOneof("value") == "encrypted_packet"


# ----------------------------------------------------------------------------- configuration

BASE = """\
livekit:
  url: ws://127.0.0.1:7880
  api_key: devkey
  api_secret: a-secret-of-at-least-32-characters!
  rooms: [lobby]
  e2ee: E2EE
connectors:
  - name: out
    from: {room: "*", packet: {topic: "*"}}
    to: {mqtt: plant, topic: "lk/{room}"}
mqtt:
  plant: {host: 127.0.0.1}
"""


def _config(e2ee: str) -> str:
    return BASE.replace("E2EE", e2ee)


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "c.yaml")
    return err.value.problems


def test_config_defaults_are_the_sdks(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("the room key\n")
    e2ee = parse_config(_config(f"{{shared_key: '${{file:{secret}}}'}}")).livekit.e2ee
    assert e2ee is not None
    assert e2ee.key() == b"the room key"
    assert (e2ee.ratchet_salt, e2ee.key_derivation) == ("LKFrameEncryptionKey", "pbkdf2")
    config = parse_config(_config(f"{{shared_key: '${{file:{secret}}}'}}"))
    assert "the room key" in config.secrets()


def test_config_base64_key_and_options() -> None:
    e2ee = parse_config(
        _config("{shared_key_base64: 'AAEC/w==', ratchet_salt: s, key_derivation: hkdf}")
    ).livekit.e2ee
    assert e2ee is not None
    assert e2ee.key() == b"\x00\x01\x02\xff"
    assert (e2ee.ratchet_salt, e2ee.key_derivation) == ("s", "hkdf")


def test_config_without_e2ee_has_none() -> None:
    assert parse_config(BASE.replace("  e2ee: E2EE\n", "")).livekit.e2ee is None


def test_config_errors_name_the_key_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    assert _errors(_config(f"{{shared_key: '${{file:{missing}}}'}}")) == [
        f"c.yaml:6: livekit.e2ee.shared_key: cannot read ${{file:{missing}}}: "
        "No such file or directory"
    ]
    assert _errors(_config("{shared_key_base64: 'not base64!'}")) == [
        "c.yaml:6: livekit.e2ee.shared_key_base64: is not valid base64"
    ]
    assert _errors(_config("{shared_key: ''}")) == ["c.yaml:6: livekit.e2ee.shared_key: is empty"]
    assert _errors(_config("{ratchet_salt: x}")) == [
        "c.yaml:6: livekit.e2ee: give shared_key or shared_key_base64 (one of them)"
    ]
    (problem,) = _errors(_config("{shared_key: k, key_derivation: scrypt}"))
    assert problem.startswith("c.yaml:6: livekit.e2ee.key_derivation: Input should be")
    (problem,) = _errors(_config("{shared_key: k, ratchet: 16}"))
    assert problem.startswith("c.yaml:6: livekit.e2ee.ratchet")


def test_a_bad_base64_key_is_never_echoed() -> None:
    (problem,) = _errors(_config("{shared_key_base64: 'secret!value!here'}"))
    assert "secret!value!here" not in problem


# ----------------------------------------------------------------------------- data tracks


def test_data_track_frames_are_encrypted_whole_with_the_iv_on_every_packet() -> None:
    from bridge.room.data_tracks import (
        DataTrackFrame,
        DataTrackPacket,
        Depacketizer,
        Packetizer,
        decode_packet,
        encode_packet,
        header_len,
    )
    from bridge.room.types import Counters

    for stamp in (None, 5):
        for e2ee in (False, True):
            packet = DataTrackPacket(
                handle=1, sequence=0, frame_number=0, timestamp=0, start=True, final=True,
                payload=b"", user_timestamp=stamp, e2ee=(0, bytes(12)) if e2ee else None,
            )  # fmt: skip
            assert len(encode_packet(packet)) == header_len(stamp, e2ee)
    cryptor = DataCryptor(KEY)
    packetizer = Packetizer(3, mtu=200, e2ee=cryptor)
    raw = packetizer.packetize(DataTrackFrame(b"reading " * 100, user_timestamp=7))
    assert len(raw) > 1 and all(len(r) <= 200 for r in raw)
    packets = [decode_packet(r) for r in raw]
    assert len({p.e2ee for p in packets}) == 1 and packets[0].e2ee is not None
    depacketizer = Depacketizer(Counters())
    frames = [f for f in (depacketizer.push(p) for p in packets) if f is not None]
    key_index, iv = packets[-1].e2ee  # type: ignore[misc]
    assert cryptor.decrypt(iv, frames[0].payload, key_index) == b"reading " * 100
    assert frames[0].user_timestamp == 7
