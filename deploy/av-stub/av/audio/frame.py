"""av.audio.frame."""

from av import AudioFrame

__all__ = ["AudioFrame"]
