"""The root of the connectors' error tree: `ConnectorError`, with `retriable` as data.

Every error a connector raises at its boundary is a `ConnectorError`; third-party exceptions
(paho, ssl, OSError, aiokafka) are wrapped and chained as `__cause__`. The supervisor reads
`retriable` to decide between reconnecting with backoff and giving up with a clear message.
Each connector module defines its own subclasses and draws them in its docstring::

    ConnectorError                  retriable: bool
    ├── MqttError                   connectors/mqtt.py
    └── KafkaError                  connectors/kafka.py

Messages follow "who: what failed: why", e.g.
``mqtt:plant: connect to mqtt://127.0.0.1:1883 failed: not authorized (CONNACK 135)``.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """A connector could not do what was asked.

    Attributes:
        retriable: True when the same call may succeed later without any change of
            configuration (broker down, timeout, connection reset); False when it cannot
            (bad credentials, TLS verification failure, a message the broker refuses).
    """

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable
