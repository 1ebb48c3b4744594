"""roombus: bridges LiveKit rooms (data packets, streams, RPC, state) to Kafka and MQTT.

`bridge.room` is the LiveKit participant (pure Python, aiortc + LiveKit protobuf signalling);
`connectors` holds the bus sides; `bridge.runtime` runs the bridge; `bridge.app` (the
composition root) wires them together and `bridge.cli` is the command line.
"""

# The one place the version is written: hatch reads it for the wheel (pyproject.toml's dynamic
# version), `roombus --version` prints it, scripts/image labels the image with it, and
# tests/deploy checks the chart's appVersion against it.
__version__ = "0.1.0"
