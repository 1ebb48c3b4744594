"""av.video."""

from av.video import codeccontext, frame

__all__ = ["codeccontext", "frame"]
