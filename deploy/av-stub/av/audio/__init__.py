"""av.audio."""

from av.audio import frame

__all__ = ["frame"]
