"""Errors raised by the LiveKit participant (`bridge.room`).

The tree::

    RoomError                      anything the room side raises
    ├── ConnectError               joining failed (retriable tells whether trying again can help)
    │   ├── InvalidUrlError        the URL is not ws(s)://host[:port]
    │   ├── AuthError              token rejected: invalid, expired, missing grants (HTTP 401/403)
    │   ├── RoomNotFoundError      the room does not exist and the server will not create it (404)
    │   └── ServerUnreachableError no answer, refused, timed out, or WebRTC never came up
    ├── NotConnectedError          an operation needs a connected room (closed, or reconnecting)
    ├── DataPacketTooLargeError    an encoded DataPacket over the 64,000-byte channel limit
    ├── StateUpdateError           the server refused a state change (NOT_ALLOWED, LIMIT_EXCEEDED)
    ├── StreamError                a text or byte stream failed (abnormal end, bad length, gap)
    └── RpcError                   an RPC failed; `code` is LiveKit's (1400-1505) or the app's

Every error says what failed and why; causes are chained.
"""

from __future__ import annotations


class RoomError(Exception):
    """Base of every error of the room side."""

    retriable: bool = False


class ConnectError(RoomError):
    """Joining the room failed."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class InvalidUrlError(ConnectError):
    """The LiveKit URL is malformed."""


class AuthError(ConnectError):
    """The server rejected the token (invalid signature, expired, missing grants)."""


class RoomNotFoundError(ConnectError):
    """The room does not exist and the server does not create rooms on join."""


class ServerUnreachableError(ConnectError):
    """The server did not answer, refused the connection, or WebRTC never connected."""

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message, retriable=retriable)


class NotConnectedError(RoomError):
    """The room is not connected (never connected, closed, or reconnecting)."""

    retriable = True


class DataPacketTooLargeError(RoomError):
    """An encoded DataPacket exceeds the limit the server accepts on a data channel."""

    def __init__(self, size: int, limit: int, what: str = "data packet") -> None:
        super().__init__(f"{what} is {size} bytes encoded, over the {limit}-byte limit")
        self.size = size
        self.limit = limit


class StateUpdateError(RoomError):
    """The server refused a change of our own name, metadata or attributes."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StreamError(RoomError):
    """A text or byte stream could not be sent or was not received whole."""


class RpcError(RoomError):
    """An RPC call failed, with LiveKit's error code, message and optional data.

    Handlers raise it to return an application error to the caller; callers receive it for
    built-in failures (timeouts, unsupported method, ...) and for the callee's errors.
    """

    # Built-in codes, identical in every LiveKit SDK and in the server.
    APPLICATION_ERROR = 1500
    CONNECTION_TIMEOUT = 1501
    RESPONSE_TIMEOUT = 1502
    RECIPIENT_DISCONNECTED = 1503
    RESPONSE_PAYLOAD_TOO_LARGE = 1504
    SEND_FAILED = 1505
    UNSUPPORTED_METHOD = 1400
    RECIPIENT_NOT_FOUND = 1401
    REQUEST_PAYLOAD_TOO_LARGE = 1402
    UNSUPPORTED_SERVER = 1403
    UNSUPPORTED_VERSION = 1404

    BUILTIN_MESSAGES: dict[int, str] = {  # noqa: RUF012 - a constant table
        1500: "Application error in method handler",
        1501: "Connection timeout",
        1502: "Response timeout",
        1503: "Recipient disconnected",
        1504: "Response payload too large",
        1505: "Failed to send",
        1400: "Method not supported at destination",
        1401: "Recipient not found",
        1402: "Request payload too large",
        1403: "RPC not supported by server",
        1404: "Unsupported RPC version",
    }

    def __init__(self, code: int, message: str | None = None, data: str | None = None) -> None:
        self.code = code
        self.message = message if message is not None else self.BUILTIN_MESSAGES.get(code, "")
        self.data = data
        super().__init__(f"RPC error {code}: {self.message}" + (f" ({data})" if data else ""))

    @classmethod
    def builtin(cls, code: int, data: str | None = None) -> RpcError:
        """A built-in error with LiveKit's standard message for `code`."""
        return cls(code, cls.BUILTIN_MESSAGES[code], data)
