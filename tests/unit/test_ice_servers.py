"""Which ICE servers of a JoinResponse our participant uses, and how it gathers on all of them."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, Literal

import aioice.ice
import pytest
from livekit.protocol import rtc

from bridge.config import ConfigError, parse_config
from bridge.room import transport
from bridge.room.transport import (
    TURN_CA_FILE_ENV,
    TurnServer,
    gather_on_every_turn_server,
    ice_configuration,
    turn_servers,
    turn_ssl_context,
)
from bridge.room.types import Counters


def _join() -> rtc.JoinResponse:
    """What a livekit-server with embedded TURN (UDP and TLS), an external TURN over TCP and
    STUN servers sends, plus URLs aioice cannot use."""
    join = rtc.JoinResponse()
    join.ice_servers.add(
        urls=["turn:192.0.2.1:3478?transport=udp", "turns:turn.example.org:443?transport=tcp"],
        username="embedded-user",
        credential="embedded-pass",
    )
    join.ice_servers.add(
        urls=["turn:relay.example.org:3479?transport=tcp"], username="ext", credential="ext-pass"
    )
    join.ice_servers.add(urls=["turn:relay.example.org"], username="bare", credential="bare-pass")
    join.ice_servers.add(urls=["stun:stun.example.org:19302", "stun:stun2.example.org:3478"])
    join.ice_servers.add(
        urls=[
            "stuns:stun.example.org:5349",  # aioice has no STUN over TLS
            "turns:relay.example.org:5349?transport=udp",  # TURN over DTLS: neither
            "turn:[2001:db8::1]:3478",  # aiortc cannot parse IPv6 literals
            "http://not-ice.example.org",
        ],
        username="u",
        credential="p",
    )
    return join


def test_every_stun_and_turn_url_is_kept_and_unusable_ones_are_left_out() -> None:
    config = ice_configuration(_join().ice_servers)
    assert config.iceServers is not None
    kept = [(server.urls, server.username, server.credential) for server in config.iceServers]
    assert kept == [
        (
            ["turn:192.0.2.1:3478?transport=udp", "turns:turn.example.org:443?transport=tcp"],
            "embedded-user",
            "embedded-pass",
        ),
        (["turn:relay.example.org:3479?transport=tcp"], "ext", "ext-pass"),
        (["turn:relay.example.org"], "bare", "bare-pass"),
        (["stun:stun.example.org:19302", "stun:stun2.example.org:3478"], None, None),
    ]


EMBEDDED = ("embedded-user", "embedded-pass")  # the embedded TURN's credentials in `_join()`


def _turn(
    url: str, host: str, port: int, kind: Literal["udp", "tcp", "tls"], login: tuple[str, str]
) -> TurnServer:
    """The TurnServer expected for `url`, with `login` as its (username, password)."""
    return TurnServer(url, host, port, kind, *login)


def test_turn_servers_of_every_kind_in_the_servers_order() -> None:
    servers = turn_servers(ice_configuration(_join().ice_servers))
    relay = "relay.example.org"
    assert servers == [
        _turn("turn:192.0.2.1:3478?transport=udp", "192.0.2.1", 3478, "udp", EMBEDDED),
        _turn("turns:turn.example.org:443?transport=tcp", "turn.example.org", 443, "tls", EMBEDDED),
        _turn(f"turn:{relay}:3479?transport=tcp", relay, 3479, "tcp", ("ext", "ext-pass")),
        _turn(f"turn:{relay}", relay, 3478, "udp", ("bare", "bare-pass")),
    ]


def test_no_servers_means_no_gathering_beyond_host_candidates() -> None:
    config = ice_configuration([])
    assert config.iceServers == []  # not aiortc's default (Google STUN)
    assert turn_servers(config) == []


def test_turn_tls_trusts_the_system_and_the_configured_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TURN_CA_FILE_ENV, raising=False)
    default = turn_ssl_context()
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    system = len(default.get_ca_certs())

    ca = tmp_path / "ca.pem"
    ca.write_bytes(_ca_pem())
    context = turn_ssl_context(str(ca))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    subjects = [cert["subject"] for cert in context.get_ca_certs()]
    assert ((("commonName", "roombus unit test CA"),),) in subjects
    assert len(subjects) == system + 1

    with pytest.raises(FileNotFoundError):
        turn_ssl_context(str(tmp_path / "missing.pem"))


def test_the_turn_ca_file_comes_from_the_room_options_else_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ice_configuration(_join().ice_servers)
    monkeypatch.delenv(TURN_CA_FILE_ENV, raising=False)
    assert {s.ca_file for s in turn_servers(config)} == {None}
    assert {s.ca_file for s in turn_servers(config, "/etc/own-ca.pem")} == {"/etc/own-ca.pem"}
    monkeypatch.setenv(TURN_CA_FILE_ENV, "/etc/env-ca.pem")
    assert {s.ca_file for s in turn_servers(config)} == {"/etc/env-ca.pem"}
    assert {s.ca_file for s in turn_servers(config, "/etc/own-ca.pem")} == {"/etc/own-ca.pem"}


def test_livekit_turn_ca_file_must_hold_ca_certificates(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(_ca_pem())
    head = (
        'livekit: {url: "ws://127.0.0.1:7880", token: t, rooms: [r], turn_ca_file: "%s"}\n'
        "mqtt: {plant: {host: 127.0.0.1}}\n"
        "connectors:\n"
        '  - {name: a, from: {mqtt: plant, topic: "x/{room}"}, to: {room: "{room}", packet: {}}}\n'
    )
    config = parse_config(head % ca, "test.yaml")
    assert config.livekit.turn_ca_file == str(ca)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    for path in (tmp_path / "missing.pem", bad):
        with pytest.raises(ConfigError) as caught:
            parse_config(head % path, "test.yaml")
        message = str(caught.value)
        assert "livekit.turn_ca_file" in message and str(path) in message, message


def _ca_pem() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "roombus unit test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class _Protocol:
    def __init__(self, candidate: aioice.Candidate) -> None:
        self.local_candidate = candidate


def test_gathering_allocates_on_every_turn_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection asks every TURN server; one that fails only costs its candidate."""
    calls: list[tuple[tuple[str, int], str, object]] = []

    async def relayed_candidate(
        *,
        component: int,
        hide_related_address: bool,
        protocol_factory: Any,
        turn_server: tuple[str, int],
        turn_username: str | None,
        turn_password: str | None,
        turn_ssl: object,
        turn_transport: str,
    ) -> tuple[aioice.Candidate, _Protocol]:
        calls.append((turn_server, turn_transport, turn_ssl))
        host, port = turn_server
        if host == "broken.example.org":
            raise ConnectionRefusedError("refused")
        candidate = aioice.Candidate(
            foundation="x",
            component=component,
            transport="udp",
            priority=1,
            host="198.51.100.7",
            port=port + 10000,
            type="relay",
        )
        return candidate, _Protocol(candidate)

    monkeypatch.setattr(aioice.ice, "relayed_candidate", relayed_candidate)
    monkeypatch.delenv(TURN_CA_FILE_ENV, raising=False)
    join = _join()
    join.ice_servers.add(urls=["turn:broken.example.org:3000?transport=tcp"], username="b")
    servers = turn_servers(ice_configuration(join.ice_servers))
    connection = aioice.Connection(ice_controlling=True, turn_server=("first.example.org", 1))
    counters = Counters()
    assert gather_on_every_turn_server(connection, servers, counters)
    assert connection.turn_server is None  # aioice itself no longer allocates

    candidates = asyncio.run(connection.get_component_candidates(component=1, addresses=[]))

    assert [(c[0], c[1]) for c in calls] == [
        (("192.0.2.1", 3478), "udp"),
        (("turn.example.org", 443), "tcp"),
        (("relay.example.org", 3479), "tcp"),
        (("relay.example.org", 3478), "udp"),
        (("broken.example.org", 3000), "tcp"),
    ]
    assert isinstance(calls[1][2], ssl.SSLContext)  # turns: verifies the server's certificate
    assert [c[2] for c in calls if c[0][0] != "turn.example.org"] == [False] * 4
    assert [(c.type, c.port) for c in candidates] == [
        ("relay", 13478),
        ("relay", 10443),
        ("relay", 13479),
        ("relay", 13478),
    ]
    # Relays by UDP before TCP before TLS (libwebrtc's order); each server its own foundation.
    udp, tls, tcp, _ = candidates
    assert udp.priority > tcp.priority > tls.priority
    assert len({c.foundation for c in candidates[:3]}) == 3
    assert counters["transport.turn_failed"] == 1
    # The relay candidates' protocols join the connection (checks, keepalives, close).
    assert [p.local_candidate for p in connection._protocols] == candidates
    assert [getattr(p, "roombus_turn").url for p in connection._protocols]  # noqa: B009 == [s.url for s in servers[:4]]


def test_selection_is_unchanged_without_turn_servers() -> None:
    connection = aioice.Connection(ice_controlling=True)
    original = connection.get_component_candidates
    assert not gather_on_every_turn_server(connection, [], Counters())
    assert connection.get_component_candidates == original
    assert transport.GATHER_TIMEOUT == 5
