"""The contiguous-offset tracker behind KafkaSource's manual commits, the settings checks, the
error tree's `retriable` flags, the reconnect backoff and the aiokafka log filter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.kafka import (
    KafkaConfigError,
    KafkaSettings,
    OffsetTracker,
    PartitionOffsets,
)


@st.composite
def deliveries_and_acks(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Increasing offsets (with gaps, as compaction leaves) and some of them acked in any order."""
    start = draw(st.integers(0, 10**6))
    gaps = draw(st.lists(st.integers(1, 3), min_size=0, max_size=60))
    offsets = [start]
    for gap in gaps:
        offsets.append(offsets[-1] + gap)
    acked = draw(st.lists(st.sampled_from(offsets), unique=True))
    return offsets, draw(st.permutations(acked))


@given(deliveries_and_acks())
def test_commit_position_is_one_past_the_acked_prefix(case: tuple[list[int], list[int]]) -> None:
    offsets, ack_order = case
    state = PartitionOffsets()
    for offset in offsets:
        state.delivered(offset)
    for offset in ack_order:
        assert state.ack(offset)
    acked = set(ack_order)
    prefix = 0
    while prefix < len(offsets) and offsets[prefix] in acked:
        prefix += 1
    expected = offsets[prefix - 1] + 1 if prefix else None
    assert state.commit_position == expected
    assert state.in_flight == len(offsets) - len(acked)


@given(deliveries_and_acks())
def test_commit_position_never_moves_back_while_acking(case: tuple[list[int], list[int]]) -> None:
    offsets, ack_order = case
    state = PartitionOffsets()
    for offset in offsets:
        state.delivered(offset)
    last = -1
    for offset in ack_order:
        state.ack(offset)
        position = state.commit_position if state.commit_position is not None else -1
        assert position >= last
        last = position


def test_duplicate_and_unknown_acks_are_refused() -> None:
    state = PartitionOffsets()
    for offset in (10, 11, 12):
        state.delivered(offset)
    assert state.ack(11)
    assert not state.ack(11)  # twice
    assert not state.ack(99)  # never delivered
    assert state.commit_position is None  # 10 still outstanding
    assert state.ack(10)
    assert state.commit_position == 12
    assert not state.ack(10)  # already below the commit position
    assert state.in_flight == 1


def test_offsets_must_increase() -> None:
    state = PartitionOffsets()
    state.delivered(5)
    with pytest.raises(ValueError, match="offset 5 delivered after 5"):
        state.delivered(5)


def test_tracker_reports_only_moved_positions_and_forgets_revoked() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    a, b = tracker.partition("t-0"), tracker.partition("t-1")
    for offset in range(3):
        a.delivered(offset)
        b.delivered(offset)
    a.ack(0)
    a.ack(2)
    assert tracker.to_commit() == {"t-0": 1}
    assert tracker.in_flight == 4
    tracker.mark_committed({"t-0": 1})
    assert tracker.to_commit() == {}
    a.ack(1)
    assert tracker.to_commit(["t-0"]) == {"t-0": 3}
    tracker.drop(["t-1"])
    assert b.revoked
    assert tracker.in_flight == 0
    assert tracker.get("t-1") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bootstrap_servers": []}, "at least one host:port"),
        ({"bootstrap_servers": ["nohost"]}, "'nohost' is not host:port"),
        ({"security_protocol": "SASL_SSL"}, "sasl_mechanism: required"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
            "username/password: required",
        ),
        ({"sasl_mechanism": "PLAIN"}, "does not use SASL"),
        ({"acks": 1}, "not allowed with enable_idempotence"),
        ({"cert_file": "c.pem"}, "give both or neither"),
        ({"delivery_timeout": 0}, "delivery_timeout: must be positive"),
        ({"linger": -1}, "must not be negative"),
        ({"batch_size": 0}, "batch_size: must be positive"),
        ({"reconnect_backoff": 0}, "reconnect_backoff: must be positive"),
        ({"reconnect_backoff_max": 0.1}, "reconnect_backoff_max: must be at least"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, object], message: str) -> None:
    kwargs.setdefault("bootstrap_servers", ["127.0.0.1:9092"])
    with pytest.raises(KafkaConfigError, match=message):
        KafkaSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_accept_comma_list_and_hide_password() -> None:
    settings = KafkaSettings(
        "a:1, b:2",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        username="u",
        password="hunter2",
    )
    assert settings.bootstrap_servers == ("a:1", "b:2")
    assert settings.cluster == "a:1,b:2"
    assert "hunter2" not in repr(settings)
    assert KafkaSettings(["a:1"], acks=0, enable_idempotence=False).acks == 0


def test_errors_carry_retriable_as_data_and_share_the_connector_root() -> None:
    from bridge.errors import ConnectorError
    from connectors.kafka import (
        KafkaAuthError,
        KafkaConnectError,
        KafkaDeliveryError,
        KafkaRecordTooLargeError,
    )

    assert KafkaConnectError("x").retriable
    assert not KafkaAuthError("x").retriable
    assert isinstance(KafkaAuthError("x"), KafkaConnectError)
    assert KafkaDeliveryError("x").retriable
    assert not KafkaDeliveryError("x", retriable=False).retriable
    assert not KafkaRecordTooLargeError("x").retriable
    assert isinstance(KafkaConfigError("x"), ConnectorError)


def test_every_error_class_says_whether_a_retry_can_help() -> None:
    from connectors.kafka import (
        KafkaAuthError,
        KafkaClosedError,
        KafkaConnectError,
        KafkaDeliveryError,
        KafkaInvalidMessageError,
        KafkaRecordTooLargeError,
        KafkaTlsError,
        KafkaUnknownTopicError,
    )

    retriable = {KafkaConnectError: True, KafkaDeliveryError: True}
    final = [
        KafkaConfigError,
        KafkaAuthError,
        KafkaTlsError,
        KafkaUnknownTopicError,
        KafkaRecordTooLargeError,
        KafkaInvalidMessageError,
        KafkaClosedError,
    ]
    for cls, flag in retriable.items():
        assert cls("x").retriable is flag
    for cls in final:
        assert cls("x").retriable is False, cls
    assert isinstance(KafkaTlsError("x"), KafkaConnectError)


def test_reconnect_backoff_is_full_jitter_and_capped() -> None:
    from connectors.kafka import backoff_delay

    settings = KafkaSettings(["a:1"], reconnect_backoff=0.5, reconnect_backoff_max=4.0)
    for attempt in range(1, 12):
        high = min(4.0, 0.5 * 2 ** (attempt - 1))
        delays = [backoff_delay(settings, attempt) for _ in range(50)]
        assert all(0.0 <= d <= high for d in delays)
    late = [backoff_delay(settings, 20) for _ in range(200)]
    assert max(late) <= 4.0 and max(late) > 1.0  # capped, and jittered over the whole range


def test_log_filter_drops_aiokafka_connectivity_lines_and_outage_symptoms() -> None:
    import logging

    import connectors.kafka as kafka

    kafka.tame_aiokafka_logs()
    client_log = logging.getLogger("aiokafka")
    coordinator_log = logging.getLogger("aiokafka.consumer.group_coordinator")
    assert kafka._OUTAGE_FILTER in client_log.filters
    assert kafka._OUTAGE_FILTER in coordinator_log.filters

    def passes(logger: logging.Logger, level: int, msg: str) -> bool:
        record = logger.makeRecord(logger.name, level, __file__, 1, msg, ("x", "y"), None)
        return bool(kafka._OUTAGE_FILTER.filter(record))

    noise = "Unable connect to node with id %s: %s"
    symptom = "Heartbeat send request failed: %s. Will retry."
    assert not passes(client_log, logging.ERROR, noise)
    assert passes(coordinator_log, logging.ERROR, symptom)  # no outage: a real event
    assert passes(client_log, logging.INFO, noise)  # only WARNING and ERROR are filtered
    reach = kafka._Reachability("kafka:t", "a:1")
    reach.down("cannot connect to broker a:1")
    try:
        assert not passes(coordinator_log, logging.ERROR, symptom)
        assert passes(coordinator_log, logging.CRITICAL, symptom)
    finally:
        reach.up()
    assert passes(coordinator_log, logging.ERROR, symptom)
