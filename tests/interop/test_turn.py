"""Our participant on a network without UDP: through the server's embedded TURN over TCP or TLS.

The network: our participant's only interface address is 192.0.2.3 (added to the namespace's
`rb1` for the test; aioice is told to gather there only), and the firewall of the test's
namespace drops every UDP packet from or to 192.0.2.3 and every UDP packet from or to the TURN
server's UDP port. So neither a host candidate nor TURN over UDP can work for us, and the only
way in is a relay allocated over TCP or TLS; the relay talks UDP to the server's media port
from the server's own address, as TURN does. The official SDK peer gathers on the namespace's
other addresses (192.0.2.1, .2) and reaches the media port over UDP as usual: it is the
independent end of every leg, not the subject. The rules live in a chain of their own in the
namespace `scripts/netns` made for this run (no other run sees them) and go with the address at
the end of each test.

Two servers, because the embedded TURN has one TCP listener, either TLS or plain:
* TLS: `turn.tls_port` 443 (the port livekit-server announces in `turns:<domain>:443`) with a
  certificate for 192.0.2.1 from a CA the test makes; our participant trusts it through
  `ROOMBUS_TURN_CA_FILE`. The SDK peer does not trust it (its TLS TURN fails, harmlessly).
* TCP: the same listener as plain TCP (`turn.external_tls`, as behind a TLS-terminating proxy),
  announced by `rtc.turn_servers` as `turn:192.0.2.1:3591?transport=tcp`, with credentials the
  embedded TURN accepts (its own scheme, computed here). The server still announces its
  `turns:...:443` too, where nothing listens: a refused server costs nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aioice.ice
import pytest
from livekit import rtc

from bridge.room.events import DataReceived
from bridge.room.room import Room, RoomOptions
from bridge.room.rpc import RpcInvocationData
from bridge.room.transport import TURN_CA_FILE_ENV
from tests.interop.conftest import eventually, our_peer, sdk_peer
from tests.services import LIVEKIT_API_KEY, LIVEKIT_API_SECRET, LiveKitServer
from tests.services import test_ip as server_ip

OUR_IP = "192.0.2.3"
HTTP_PORT, MEDIA_PORT, TURN_UDP_PORT, TURN_TCP_PORT = 7990, 7992, 3590, 3591
TURN_TLS_PORT = 443  # livekit-server always announces its TURN/TLS on 443
CHAIN = f"ROOMBUS-TURN-{os.getpid()}"
MODES = {"single": True, "dual": False}


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")


@pytest.fixture
def udp_blocked_for_us(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Our participant on 192.0.2.3, where the namespace's firewall lets no UDP through."""
    if not os.environ.get("ROOMBUS_NETNS"):
        raise AssertionError(
            "test_turn changes the firewall and addresses of its network namespace: run it "
            "with scripts/netns (scripts/test does), never on the host's own network"
        )
    for tool in ("iptables", "ip"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} not found on PATH (apt-get install iptables iproute2)")
    undo: list[tuple[str, ...]] = []
    try:
        _run("ip", "addr", "add", f"{OUR_IP}/32", "dev", "rb1")
        undo.append(("ip", "addr", "del", f"{OUR_IP}/32", "dev", "rb1"))
        _run("iptables", "-N", CHAIN)
        undo.append(("iptables", "-X", CHAIN))
        undo.append(("iptables", "-F", CHAIN))
        for rule in (
            ["-s", OUR_IP],
            ["-d", OUR_IP],
            ["--dport", str(TURN_UDP_PORT)],
            ["--sport", str(TURN_UDP_PORT)],
        ):
            # -p before --dport/--sport: those are options of the udp match.
            _run("iptables", "-A", CHAIN, "-p", "udp", *rule, "-j", "DROP")
        # In INPUT: a silent drop, as a firewall on the way does (locally sent packets to a
        # local address pass OUTPUT, lo and INPUT).
        _run("iptables", "-I", "INPUT", "-j", CHAIN)
        undo.append(("iptables", "-D", "INPUT", "-j", CHAIN))
        monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda **_: [OUR_IP])
        yield
    finally:
        errors = []
        for command in reversed(undo):
            try:
                _run(*command)
            except AssertionError as exc:
                errors.append(str(exc))
        if errors:
            raise AssertionError("could not undo the test's network changes: " + "; ".join(errors))


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for the test address it signed: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "roombus TURN test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_ip())]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(server_ip()))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "turn.pem", directory / "turn.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


_BASE62 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _base62(src: bytes) -> str:
    """github.com/jxskiss/base62 (StdEncoding, EncodeToString), which livekit-server uses."""
    out = []
    pos = len(src) * 8
    while pos > 0:
        size = 6
        r, i = pos & 7, pos >> 3
        if r == 0:
            i, r = i - 1, 8
        b = src[i] >> (8 - r)
        if r < 6 and i > 0:
            b |= (src[i - 1] << r) & 0xFF
        b &= 0x3F
        if b & 0x1E == 0x1E:
            if pos > 6 or b > 0x1F:
                size = 5
            b &= 0x1F
        out.append(_BASE62[b])
        pos -= size
    return "".join(out)


def test_base62_matches_livekit_servers() -> None:
    # Reference values printed by github.com/jxskiss/base62 v1.1.0 EncodeToString.
    assert _base62(b"a") == "hB"
    assert _base62(b"\xff\xfe\x00\x1e\x3f") == "fxDA8ffB"
    assert _base62(b"roombus-devkey|PA_turn|1999999999") == (
        "5kTO5kTO5kTOxwnbyVHdfKIo4LvyWzuyIrl5qTs2e2byB"
    )


def _embedded_turn_credentials(identity: str) -> tuple[str, str]:
    """A username and password the embedded TURN accepts (`pkg/service/turn.go`: the username
    is base62 of "key|participant|expiry", the password base62 of sha256 of
    "secret|participant|expiry"); valid for an hour."""
    expiry = int(time.time()) + 3600
    username = _base62(f"{LIVEKIT_API_KEY}|{identity}|{expiry}".encode())
    digest = hashlib.sha256(f"{LIVEKIT_API_SECRET}|{identity}|{expiry}".encode()).digest()
    return username, _base62(digest)


def _turn_overrides(kind: str, directory: Path) -> dict[str, Any]:
    turn: dict[str, Any] = {"domain": server_ip()}
    rtc_config: dict[str, Any] = {}
    if kind == "tls":
        _, cert, key = _certificates(directory)
        turn |= {"tls_port": TURN_TLS_PORT, "cert_file": str(cert), "key_file": str(key)}
    else:
        username, password = _embedded_turn_credentials("PA_turn_over_tcp")
        turn |= {"tls_port": TURN_TCP_PORT, "external_tls": True}
        rtc_config["turn_servers"] = [
            {
                "host": server_ip(),
                "port": TURN_TCP_PORT,
                "protocol": "tcp",
                "username": username,
                "credential": password,
            }
        ]
    return {"turn": turn, "rtc": rtc_config}


@asynccontextmanager
async def turn_server(kind: str, workdir: Path) -> AsyncIterator[LiveKitServer]:
    """A livekit-server of the test's own whose embedded TURN takes TLS or plain TCP."""
    server = LiveKitServer(
        name=f"livekit-turn-{kind}",
        workdir=workdir,
        port=HTTP_PORT,
        udp_port=MEDIA_PORT,
        turn_port=TURN_UDP_PORT,
        overrides=_turn_overrides(kind, workdir),
    )
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def _routes(ours: Room) -> set[str | None]:
    session = ours._session
    assert session is not None and session.publisher is not None
    assert session.subscriber is not None
    return {session.publisher.route, session.subscriber.route}


def _collect(sdk: rtc.Room) -> asyncio.Queue[rtc.DataPacket]:
    queue: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
    sdk.on("data_received", queue.put_nowait)
    return queue


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["tcp", "tls"])
@pytest.mark.usefixtures("udp_blocked_for_us")
async def test_every_leg_through_turn_without_udp(
    kind: str, mode: str, tmp_path: Path, room_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with turn_server(kind, tmp_path) as server:
        if kind == "tls":
            monkeypatch.setenv(TURN_CA_FILE_ENV, str(tmp_path / "ca.pem"))
        expected = (
            f"relay turns:{server_ip()}:{TURN_TLS_PORT}?transport=tcp"
            if kind == "tls"
            else f"relay turn:{server_ip()}:{TURN_TCP_PORT}?transport=tcp"
        )
        options = RoomOptions(single_peer_connection=MODES[mode])
        async with (
            sdk_peer(server, room_name, "sdk") as sdk,
            our_peer(server, room_name, "ours", options=options) as ours,
        ):
            # The only way we could have connected: every connection relayed over TCP/TLS.
            assert _routes(ours) == {expected}
            # UDP TURN (blocked) and, for TCP, the announced `turns:` on 443 (nothing there)
            # failed on every connection, without failing the join.
            failed = 1 if kind == "tls" else 2
            assert ours.counters["transport.turn_failed"] == failed * (1 if mode == "single" else 2)
            await eventually(lambda: "ours" in sdk.remote_participants, what="sdk sees us")
            await eventually(lambda: "sdk" in ours.remote_participants, what="we see the sdk")

            # Reliable packets both ways, in order.
            got = _collect(sdk)
            async with ours.events(DataReceived) as events:
                for i in range(50):
                    await ours.local_participant.publish_data(f"o{i}".encode(), topic="t")
                    await sdk.local_participant.publish_data(f"s{i}".encode(), topic="t")
                to_sdk = [(await asyncio.wait_for(got.get(), 10)).data for _ in range(50)]
                to_ours = [(await asyncio.wait_for(anext(events), 10)).packet for _ in range(50)]
            assert to_sdk == [f"o{i}".encode() for i in range(50)]
            assert [p.data for p in to_ours] == [f"s{i}".encode() for i in range(50)]
            assert {p.participant_identity for p in to_ours} == {"sdk"}

            # A 100 KB byte stream each way (several chunks, flow control over the relay).
            blob = os.urandom(100_000)
            received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            async def read_sdk(reader: rtc.ByteStreamReader) -> None:
                received.set_result(b"".join([chunk async for chunk in reader]))

            readers: list[asyncio.Task[None]] = []
            sdk.register_byte_stream_handler(
                "blob", lambda reader, _who: readers.append(asyncio.create_task(read_sdk(reader)))
            )
            await ours.local_participant.send_bytes(blob, topic="blob", name="blob.bin")
            assert hashlib.sha256(await asyncio.wait_for(received, 30)).digest() == (
                hashlib.sha256(blob).digest()
            )

            # RPC both ways.
            async def reverse(data: RpcInvocationData) -> str:
                return data.payload[::-1]

            ours.local_participant.register_rpc_method("reverse", reverse)
            sdk.local_participant.register_rpc_method("reverse", lambda d: d.payload[::-1])
            to_sdk_answer, to_ours_answer = await asyncio.gather(
                ours.local_participant.perform_rpc(
                    destination_identity="sdk", method="reverse", payload="über TURN"
                ),
                sdk.local_participant.perform_rpc(
                    destination_identity="ours", method="reverse", payload="über TURN"
                ),
            )
            assert to_sdk_answer == to_ours_answer == "NRUT rebü"
