"""roombus: bridges LiveKit rooms (data packets, streams, RPC, state) to Kafka and MQTT.

`bridge.room` is the LiveKit participant (pure Python, aiortc + LiveKit protobuf signalling);
`connectors` holds the bus sides; `bridge.cli` wires them together.
"""

__version__ = "0.1.0"
