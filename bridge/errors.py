"""The bridge's error tree, shared by the core and every endpoint.

::

    BridgeError
    ├── ConnectorError            retriable: bool   an endpoint could not do what was asked
    │   ├── MqttError             connectors/mqtt.py
    │   └── KafkaError            connectors/kafka.py
    └── RejectedMessage           reason: str       a message that can never go along its route

`retriable` decides between waiting and giving up: a retriable error (broker down, timeout,
connection reset, room rejoining) is retried with capped, jittered backoff by `bridge.retry`; a
non-retriable one (bad credentials, a record the broker refuses, an oversized packet) is turned
into a `RejectedMessage` once and never retried. Third-party exceptions are wrapped at the
endpoint boundary and chained as ``__cause__``.

Messages follow "who: what failed: why", e.g.
``mqtt:plant: connect to mqtt://127.0.0.1:1883 failed: not authorized (CONNACK 135)``.
"""

from __future__ import annotations


class BridgeError(Exception):
    """The root of every error the bridge raises on purpose."""


class ConnectorError(BridgeError):
    """An endpoint could not do what was asked.

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


class RejectedMessage(BridgeError):
    """A message that cannot go along its route, decided once.

    Attributes:
        reason: A short metric-friendly word (``too_large``, ``invalid_json``, ``refused``...).
        detail: What exactly was wrong, for the log line and the dead-letter headers.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
