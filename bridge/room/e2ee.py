"""End-to-end encryption of data packets and streams with a shared key, as LiveKit's SDKs do it.

In an E2EE room every participant holds the same key, and the SFU forwards data it cannot
read. A sender replaces the `value` of a DataPacket (user packet, chat message, RPC request,
ack or response, stream header, chunk or trailer) by `encrypted_packet`: an `EncryptedPacket`
whose `encrypted_value` is the AES-GCM encryption of an `EncryptedPacketPayload` holding that
same value. What the server needs stays clear: `kind`, `destination_identities`, the sender's
`participant_identity`/`participant_sid` (filled in by the server) and `sequence`. Other
cases (SIP DTMF, transcriptions, metrics) are never encrypted.

The cipher, checked against the SDKs' sources (LiveKit's webrtc fork
`api/crypto/frame_crypto_transformer.{h,cc}`, `DataPacketCryptor`, which the Rust core — so
the Python and Node SDKs — uses; livekit-client's `e2ee/worker/DataCryptor.ts`, `utils.ts`):

- the shared key is *key material*, not the AES key: the key is derived from it with the
  key provider's derivation, PBKDF2-HMAC-SHA256 with 100,000 iterations (the default) or
  HKDF-SHA256 with 128 zero bytes of info, salted with the ratchet salt (default
  ``LKFrameEncryptionKey``), 16 bytes long: AES-128-GCM;
- a 12-byte IV per packet, sent in the clear in `EncryptedPacket.iv`; a 16-byte tag at the
  end of the ciphertext; no additional authenticated data;
- `key_index` names the slot of the key ring; a shared key is set at index 0.

Data-track frames use the same cipher and key (`encrypt`/`decrypt`, called by
`bridge.room.data_tracks`); RPC replies to server-initiated calls stay clear (`Room._seal`).
Not done: ratcheting (the SDKs try up to `ratchet_window_size` ratcheted keys when a packet
does not decrypt, for peers that ratchet the shared key), key rotation, per-participant keys
and media. See `docs/e2ee.md`.
"""

from __future__ import annotations

import os
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from google.protobuf.message import DecodeError
from livekit.protocol import models

KeyDerivation = Literal["pbkdf2", "hkdf"]

DEFAULT_RATCHET_SALT = b"LKFrameEncryptionKey"
PBKDF2_ITERATIONS = 100_000
HKDF_INFO = bytes(128)
KEY_BYTES = 16  # DeriveKeys(material, salt, 128): AES-128-GCM
IV_BYTES = 12
TAG_BYTES = 16
GCM = models.Encryption.Type.GCM

# The DataPacket cases an `EncryptedPacketPayload` can carry (the same names in both messages).
ENCRYPTABLE = frozenset(f.name for f in models.EncryptedPacketPayload.DESCRIPTOR.fields)


class DecryptError(Exception):
    """An encrypted packet could not be opened (wrong key, other cipher, damaged payload)."""


def derive_key(
    material: bytes, *, salt: bytes = DEFAULT_RATCHET_SALT, key_derivation: KeyDerivation = "pbkdf2"
) -> bytes:
    """The AES key the SDKs derive from a shared key (`material`)."""
    if key_derivation == "pbkdf2":
        kdf: PBKDF2HMAC | HKDF = PBKDF2HMAC(
            algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, iterations=PBKDF2_ITERATIONS
        )
    elif key_derivation == "hkdf":
        kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=HKDF_INFO)
    else:
        raise ValueError(f"unknown key derivation {key_derivation!r} (pbkdf2 or hkdf)")
    return kdf.derive(material)


class DataCryptor:
    """Seals and opens DataPackets with one shared key (see the module docstring).

    The key is derived once, here (PBKDF2 takes tens of milliseconds): build one per key and
    share it between rooms.
    """

    __slots__ = ("_aead", "key_index")

    def __init__(
        self,
        shared_key: bytes,
        *,
        ratchet_salt: bytes = DEFAULT_RATCHET_SALT,
        key_derivation: KeyDerivation = "pbkdf2",
        key_index: int = 0,
    ) -> None:
        if not shared_key:
            raise ValueError("the shared key is empty")
        self._aead = AESGCM(
            derive_key(shared_key, salt=ratchet_salt, key_derivation=key_derivation)
        )
        self.key_index = key_index

    def encrypt(self, plaintext: bytes) -> tuple[bytes, bytes]:
        """`(iv, ciphertext with its tag)` for `plaintext`, under a fresh random IV."""
        iv = os.urandom(IV_BYTES)
        return iv, self._aead.encrypt(iv, plaintext, None)

    def decrypt(self, iv: bytes, ciphertext: bytes, key_index: int = 0) -> bytes:
        """The plaintext of `ciphertext`; raises `DecryptError` when it does not authenticate."""
        if key_index != self.key_index:
            raise DecryptError(f"key index {key_index} (we hold index {self.key_index})")
        if len(iv) != IV_BYTES:
            raise DecryptError(f"IV of {len(iv)} bytes (AES-GCM here takes {IV_BYTES})")
        try:
            return self._aead.decrypt(iv, ciphertext, None)
        except InvalidTag:
            raise DecryptError("does not decrypt with our key (a different key?)") from None

    def seal(self, packet: models.DataPacket) -> models.DataPacket:
        """`packet` with its value encrypted; as it is when its kind is never encrypted."""
        which = packet.WhichOneof("value")
        if which not in ENCRYPTABLE:
            return packet
        payload = models.EncryptedPacketPayload()
        getattr(payload, which).CopyFrom(getattr(packet, which))
        iv, ciphertext = self.encrypt(payload.SerializeToString())
        return models.DataPacket(
            kind=packet.kind,
            participant_identity=packet.participant_identity,
            participant_sid=packet.participant_sid,
            destination_identities=packet.destination_identities,
            sequence=packet.sequence,
            encrypted_packet=models.EncryptedPacket(
                encryption_type=GCM,
                iv=iv,
                key_index=self.key_index,
                encrypted_value=ciphertext,
            ),
        )

    def open(self, packet: models.DataPacket) -> models.DataPacket:
        """The plain DataPacket inside an `encrypted_packet` one; raises `DecryptError`."""
        sealed = packet.encrypted_packet
        if sealed.encryption_type != GCM:
            kind = models.Encryption.Type.Name(sealed.encryption_type)
            raise DecryptError(f"encryption type {kind} (only GCM is supported)")
        plaintext = self.decrypt(sealed.iv, sealed.encrypted_value, sealed.key_index)
        payload = models.EncryptedPacketPayload()
        try:
            payload.ParseFromString(plaintext)
        except DecodeError as exc:
            raise DecryptError(
                f"the decrypted payload is not an EncryptedPacketPayload: {exc}"
            ) from None
        which = payload.WhichOneof("value")
        if which is None:
            raise DecryptError("the decrypted payload holds nothing we know")
        opened = models.DataPacket(
            kind=packet.kind,
            participant_identity=packet.participant_identity,
            participant_sid=packet.participant_sid,
            destination_identities=packet.destination_identities,
            sequence=packet.sequence,
        )
        getattr(opened, which).CopyFrom(getattr(payload, which))
        return opened
