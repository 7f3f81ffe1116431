"""Synthetic test videos, encoded with PyAV: seeded frames that differ from each other, in several
codecs and containers (the container follows the file's extension)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frames(count: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    # -> uint8 [count, height, width, 3]: 8×8 blocks of seeded colours, new ones every frame
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (count, -(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    return blocks.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]


def encode(
    path: Path,
    pixels: np.ndarray,
    fps: Fraction | int,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    rotation: int | None = None,
    audio: bool = False,
) -> Path:
    """pixels: uint8 [N, H, W, 3] RGB -> a video file of N frames at fps (a counterclockwise
    display rotation and a silent AAC track on request)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        sound = container.add_stream("aac", rate=16000) if audio else None
        for i, image in enumerate(pixels):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / Fraction(fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if sound is not None:
            silence = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
            silence.sample_rate = 16000
            container.mux(sound.encode(silence))
            container.mux(sound.encode())
    return path


def audio_only(path: Path) -> Path:
    """An M4A file with one second of silence and no video stream."""
    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=16000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        silence.sample_rate = 16000
        container.mux(sound.encode(silence))
        container.mux(sound.encode())
    return path


def remux_every_packet_as_keyframe(source: Path, path: Path) -> Path:
    """The same packets in a new file whose index calls every frame a keyframe: a seek there lands
    on frames that cannot be decoded on their own."""
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = stream
                packet.is_keyframe = True
                dst.mux(packet)
    return path
