"""roombus: bridges LiveKit rooms (data packets, streams, RPC, state) to Kafka and MQTT.

`bridge.room` is the LiveKit participant (pure Python, aiortc + LiveKit protobuf signalling);
`connectors` holds the bus sides; `bridge.runtime` runs the bridge; `bridge.app` (the
composition root) wires them together and `bridge.cli` is the command line.
"""

__version__ = "0.1.0"
