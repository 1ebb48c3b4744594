"""A stand-in for PyAV in the container image, which carries no media codecs.

roombus bridges data only (packets, streams, RPC, state) and never subscribes to a track, so
aiortc never encodes or decodes media. aiortc imports PyAV all the same (its codec and track
modules name PyAV's classes at import time), and PyAV's wheel links ~100 MB of FFmpeg libraries
(libavcodec with x264, x265, SVT-AV1, libvpx, dav1d, ...) at `import av`: none can be left out
while the real `av` still imports. So the image (Dockerfile, build stage) uninstalls PyAV and
puts this package in its place: the names aiortc imports, each of which raises FFmpegError when
used. tests/deploy/test_av_stub.py checks that it covers every PyAV name aiortc uses, and the
image test runs the bridge on it. pip installs (deploy/constraints.txt) keep the real PyAV.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NoReturn

__version__ = "0+roombus.no-codecs"


class FFmpegError(Exception):
    """PyAV's error type; here raised by anything that would touch media."""


def unavailable(what: str) -> NoReturn:
    """Raise the error every media operation of this stand-in ends in."""
    raise FFmpegError(f"{what}: the roombus image carries no media codecs (PyAV is a stand-in)")


class _NoMedia:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unavailable(type(self).__name__)


class Frame(_NoMedia):
    """av.frame.Frame."""


class AudioFrame(Frame):
    """av.audio.frame.AudioFrame."""


class VideoFrame(Frame):
    """av.video.frame.VideoFrame."""


class PictureType(IntEnum):
    """av.video.frame.PictureType (the values of FFmpeg's AVPictureType)."""

    NONE = 0
    I = 1  # noqa: E741 (PyAV's name)
    P = 2
    B = 3


class Packet(_NoMedia):
    """av.packet.Packet."""


class AudioResampler(_NoMedia):
    """av.audio.resampler.AudioResampler."""


class CodecContext(_NoMedia):
    """av.codec.context.CodecContext: no codec can be created."""

    @staticmethod
    def create(codec: object, mode: str = "r", **kwargs: Any) -> NoReturn:
        """PyAV's factory of encoders and decoders."""
        unavailable(f"codec {codec!r}")


class VideoCodecContext(CodecContext):
    """av.video.codeccontext.VideoCodecContext."""


# The submodules aiortc imports from; `import av` loads them, as PyAV's own __init__ does.
from av import audio, frame, packet, video  # noqa: E402

__all__ = [
    "AudioFrame",
    "AudioResampler",
    "CodecContext",
    "FFmpegError",
    "Frame",
    "Packet",
    "VideoFrame",
    "audio",
    "frame",
    "packet",
    "video",
]
