"""Every endpoint type is a `Source[Envelope]` and/or a `Sink[Outbound]` of `bridge/endpoint.py`.

The seam is a `typing.Protocol`, so conformance is structural: the annotated assignments below
are what mypy checks (``mypy --strict`` runs over tests/). The runtime asserts only catch what a
type checker would also refuse, for a run without mypy.
"""

from __future__ import annotations

from bridge.endpoint import Sink, Source
from bridge.envelope import Envelope, Outbound
from connectors.kafka import KafkaSettings, KafkaSink, KafkaSource
from connectors.memory import MemoryBus
from connectors.mqtt import MqttConnector, MqttSettings

SEAM = ("name", "connected", "__aenter__", "__aexit__")


def test_each_endpoint_type_conforms_to_the_seam() -> None:
    bus = MemoryBus("memory:x")
    mqtt = MqttConnector("mqtt:x", MqttSettings(host="127.0.0.1"))
    kafka = KafkaSettings(["127.0.0.1:9092"])
    kafka_source = KafkaSource("kafka:in", kafka, ["t"], "g")
    kafka_sink = KafkaSink("kafka:out", kafka)

    bus_source: Source[Envelope] = bus
    bus_sink: Sink[Outbound] = bus
    mqtt_source: Source[Envelope] = mqtt
    mqtt_sink: Sink[Outbound] = mqtt
    kafka_as_source: Source[Envelope] = kafka_source
    kafka_as_sink: Sink[Outbound] = kafka_sink

    for source in (bus_source, mqtt_source, kafka_as_source):
        missing = [a for a in (*SEAM, "messages") if not hasattr(source, a)]
        assert not missing, f"{type(source).__name__} lacks {missing}"
        assert source.connected is False  # nothing is open yet
    for sink in (bus_sink, mqtt_sink, kafka_as_sink):
        missing = [a for a in (*SEAM, "publish") if not hasattr(sink, a)]
        assert not missing, f"{type(sink).__name__} lacks {missing}"
        assert sink.connected is False
