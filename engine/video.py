"""Video input as the InternVL cards read it: decord's `VideoReader`, `get_index` and `load_video`.

Decoding is PyAV (FFmpeg in its wheels); the cards' decord has had no release since 2021. What the
cards read from decord is reproduced from its source (dmlc/decord src/video/video_reader.cc):
- `get_avg_fps()` is GetAverageFPS: the stream's avg_frame_rate, num / den as a double;
- `len(vr)` is GetFrameCount after IndexKeyframes, which the constructor runs: the number of packets
  of the video stream (av_read_frame over the whole file, nothing decoded), so frame i is the i-th
  timestamp of those packets sorted by pts;
- frames are RGB24 from FFmpeg's scaler, turned by the display matrix (GetRotation:
  -av_display_rotation_get, only 90/180/270 turn the frame; SetCodecContext's transpose filters).

The prompt side (the cards' `Frame1: <image>\\n…` prefix) is engine/prompt.py's video_question.

`probe` reads the header and the packet index and decodes only the first frame: PyAV exposes the
display matrix on frames only, and the rotation decides the frame's shape, hence its tiles.
`read_frames` decodes only what the sampled frames need: it seeks to the keyframe before each one
unless the decoder is already on its way there, and identifies frames by their pts.
"""

from __future__ import annotations

import bisect
import io
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from engine.preprocess import ImageError, load_images, tile_grid

# The demuxers FFmpeg may choose from (format_whitelist): the MP4/MOV, Matroska/WebM, AVI and
# MPEG-TS containers; never a playlist format (hls, concat) that opens other files or URLs.
CONTAINERS = "mov,matroska,avi,mpegts"
_NAMES = "an MP4/MOV, MKV/WebM, AVI or MPEG-TS"


class VideoError(ValueError):
    """The video is empty, corrupt, unsupported, over a limit, or the request does not fit it."""


@dataclass(frozen=True, slots=True)
class VideoLimits:
    max_bytes: int = 64 * 2**20  # the encoded file
    max_seconds: float = 600.0  # frames / fps
    max_frames: int = 32  # sampled frames per request (num_segments)
    max_pixels: int = 3840 * 2160  # per frame (4K UHD), from the header, before anything is decoded

    def __post_init__(self):
        for name in ("max_bytes", "max_frames", "max_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds!r}")

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> VideoLimits:
        """The build's limits as a Triton model config carries them (build/settings.py)."""
        return cls(
            int(params["max_request_bytes"]), float(params["max_video_seconds"]), int(params["max_video_frames"]), int(params["max_video_pixels"])
        )


@dataclass(frozen=True, slots=True)
class VideoInfo:
    fps: float  # decord's get_avg_fps()
    num_frames: int  # decord's len(vr)
    width: int  # as decord returns frames: after the rotation
    height: int
    rotation: int  # counterclockwise quarter turns applied to each decoded frame, 0..3
    codec: str

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


@dataclass(frozen=True, slots=True)
class _Index:
    pts: list[int] | None  # one per frame, ascending; None when the packets lack distinct timestamps
    keys: list[int]  # pts of the keyframe packets, ascending


def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    """The cards' frame sampling: num_segments frames at the middles of equal segments of [start, end]."""
    # -> frame indices: int64 [num_segments]
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return (start_idx + seg_size / 2 + np.round(seg_size * np.arange(num_segments))).astype(np.int64)


def sample_indices(info: VideoInfo, num_segments: int = 8, bound=None, limits: VideoLimits = VideoLimits()) -> np.ndarray:
    """get_index over the video, after checking num_segments and bound (seconds) against it."""
    # -> frame indices: int64 [num_segments]
    if not isinstance(num_segments, int) or not 1 <= num_segments <= limits.max_frames:
        raise VideoError(
            f"the number of frames to sample (num_segments, num_frames) must be an integer in [1, {limits.max_frames}], got {num_segments!r}"
        )
    max_frame = info.num_frames - 1
    if bound:
        try:
            start, end = (float(t) for t in bound)
        except (TypeError, ValueError):
            raise VideoError(f"bound must be (start, end) in seconds, got {bound!r}") from None
        if not (math.isfinite(start) and math.isfinite(end) and start <= end):
            raise VideoError(f"bound must be (start, end) seconds with start <= end, got {bound!r}")
        if round(start * info.fps) > max_frame or round(end * info.fps) < 0:
            raise VideoError(f"bound {bound!r} lies outside the video (0 to {info.duration:.3f} s)")
    return get_index(bound, info.fps, max_frame, first_idx=0, num_segments=num_segments)


def frame_tiles(info: VideoInfo, input_size=448, max_num=1, min_num=1, use_thumbnail=True) -> int:
    """Tiles per frame (every frame of a video has one size): load_video's dynamic_preprocess count."""
    return tile_grid(info.width, info.height, input_size, max_num, min_num, use_thumbnail)[2]


def video_bytes(video, limits: VideoLimits = VideoLimits()) -> bytes:
    """A path or encoded bytes -> the bytes, refused over max_bytes before a large file is read."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
    elif isinstance(video, (str, os.PathLike)):
        try:
            with open(video, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limits.max_bytes:
                    raise VideoError(f"video is {size} bytes; this deployment allows {limits.max_bytes}")
                data = f.read()
        except OSError as e:
            raise VideoError(f"cannot open video file {os.fspath(video)!r}: {e.strerror or e}") from e
    else:
        raise TypeError(f"video must be a path or encoded bytes, not {type(video).__name__}")
    if not data:
        raise VideoError("video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise VideoError(f"video is {len(data)} bytes; this deployment allows {limits.max_bytes}")
    return data


def probe(video, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """fps, frame count, frame size and rotation as decord reports them, without decoding past frame 0."""
    with _opened(video_bytes(video, limits), limits) as (container, stream):
        return _scan(container, stream, limits)[0]


def read_frames(video, indices: Sequence[int], limits: VideoLimits = VideoLimits()) -> list[Image.Image]:
    """Frames by index as decord's vr[i] (the i-th frame in presentation order), as RGB PIL images
    (the mode the cards' `.convert('RGB')` gives)."""
    # indices: [K] frame numbers (repeats allowed) -> K images, in the order of indices
    return _read(video_bytes(video, limits), limits, lambda info: indices)


def load_video(
    video, bound=None, input_size=448, max_num=1, num_segments=32, min_num=1, use_thumbnail=True, normalize=True,
    limits: VideoLimits = VideoLimits(),
):
    """The cards' load_video: get_index's frames, each tiled like an image (dynamic_preprocess with
    the thumbnail). normalize=False: uint8 tiles, as load_images(normalize=False) gives the vision encoder."""
    # -> (pixel_values: [sum T_i, 3, S, S] float32 (uint8 if not normalize), num_patches_list [num_segments])
    frames = _read(video_bytes(video, limits), limits, lambda info: sample_indices(info, num_segments, bound, limits))
    try:
        return load_images(frames, input_size, max_num, use_thumbnail, min_num, normalize=normalize)
    except ImageError as e:
        raise VideoError(f"cannot tile the video's frames: {e}") from e


def _read(data: bytes, limits: VideoLimits, pick) -> list[Image.Image]:
    # pick: VideoInfo -> frame numbers [K] -> those K frames as RGB images
    with _opened(data, limits) as (container, stream):
        info, index = _scan(container, stream, limits)
        indices = [int(i) for i in pick(info)]
        wanted = sorted(set(indices))
        if wanted and not 0 <= wanted[0] <= wanted[-1] < info.num_frames:
            raise VideoError(f"frame indices must be in [0, {info.num_frames}), got {wanted[0]}..{wanted[-1]}")
        frames = _decode_seeking(container, stream, index, wanted) if index.pts is not None else None
    if frames is None:  # from the start, counting frames: always right, slower
        with _opened(data, limits) as (container, stream):
            frames = _decode_sequential(container, stream, wanted)
    images = {i: Image.fromarray(np.ascontiguousarray(np.rot90(frames[i], info.rotation))) for i in wanted}
    return [images[i] for i in indices]


@contextmanager
def _opened(data: bytes, limits: VideoLimits) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    # -> (container, its best video stream, as av_find_best_stream picks it for decord); FFmpeg's
    # errors inside the block become VideoError
    try:
        container = av.open(io.BytesIO(data), container_options={"format_whitelist": CONTAINERS})
    except av.FFmpegError as e:
        raise VideoError(f"cannot read video: not {_NAMES} file, or the file is corrupt ({e.strerror})") from e
    with container:
        stream = container.streams.best("video")
        if stream is None:
            raise VideoError(f"the {container.format.name} file has no video stream")
        context = stream.codec_context
        if context is None:
            raise VideoError("unsupported video codec: this FFmpeg build has no decoder for it")
        if context.width * context.height > limits.max_pixels:
            raise VideoError(
                f"video frames are {context.width}×{context.height} = {context.width * context.height} pixels; "
                f"this deployment allows {limits.max_pixels}"
            )
        try:
            yield container, stream
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode video ({context.name}): {e.strerror}") from e


def _scan(container, stream, limits: VideoLimits) -> tuple[VideoInfo, _Index]:
    # One pass over the packets (the packet index decord builds); frame 0 is decoded for its rotation.
    rate = stream.average_rate
    if not rate or rate <= 0:
        raise VideoError("the video stream declares no frame rate (avg_frame_rate)")
    fps = rate.numerator / rate.denominator
    max_packets = math.floor(limits.max_seconds * fps)
    pts, keys, first = [], [], None
    for packet in container.demux(stream):
        if packet.size == 0 and packet.pts is None:  # PyAV's flush packet after the last one
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
        if len(pts) > max_packets:
            raise VideoError(f"video is longer than {limits.max_seconds:g} s (this deployment's limit) at {fps:.3f} fps")
        if first is None:
            first = next(iter(packet.decode()), None)
    if first is None and pts:
        first = next(iter(stream.decode(None)), None)
    if first is None:
        raise VideoError("the video stream has no decodable frame")
    quarter_turns = (first.rotation // 90) % 4 if first.rotation % 90 == 0 else 0
    width, height = (first.height, first.width) if quarter_turns % 2 else (first.width, first.height)
    info = VideoInfo(fps, len(pts), width, height, quarter_turns, stream.codec_context.name)
    distinct = None not in pts and len(set(pts)) == len(pts)
    return info, _Index(sorted(pts) if distinct else None, sorted(k for k in keys if k is not None))


def _frames(container, stream) -> Iterator[av.VideoFrame]:
    for packet in container.demux(stream):
        yield from packet.decode()


def _decode_seeking(container, stream, index: _Index, wanted: list[int]) -> dict[int, np.ndarray] | None:
    # wanted: ascending frame numbers -> {i: RGB array [H, W, 3] before rotation}, each frame found
    # by its pts; None when the file does not decode as its index says (a seek that lands elsewhere,
    # a keyframe flag on a frame that is not one): the caller then decodes sequentially.
    found, frames, position = {}, None, None
    for i in wanted:
        target = index.pts[i]
        k = bisect.bisect_right(index.keys, target) - 1
        key = index.keys[k] if k >= 0 else index.pts[0]
        if frames is None or position < key:  # a keyframe lies ahead: start decoding there
            container.seek(key, stream=stream)
            frames = _frames(container, stream)
            first = _next_at_or_after(frames, key)
            if first is None or first.pts != key or not first.key_frame:
                return None
            position = key
            frame = first
        if position < target:
            frame = _next_at_or_after(frames, target)
            position = None if frame is None else frame.pts
        if position != target:
            return None
        found[i] = frame.to_ndarray(format="rgb24")
    return found


def _next_at_or_after(frames: Iterator[av.VideoFrame], pts: int) -> av.VideoFrame | None:
    # the first frame whose pts is at least pts (frames an open GOP shows before its keyframe are
    # skipped); None at the end or at a frame without pts
    for frame in frames:
        if frame.pts is None or frame.pts >= pts:
            return frame if frame.pts is not None else None
    return None


def _decode_sequential(container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
    # wanted: ascending frame numbers -> {i: RGB array [H, W, 3] before rotation}
    found, remaining = {}, set(wanted)
    if not remaining:
        return found
    for n, frame in enumerate(_frames(container, stream)):
        if n in remaining:
            found[n] = frame.to_ndarray(format="rgb24")
            remaining.discard(n)
            if not remaining:
                return found
    raise VideoError(f"the video decodes to fewer frames than its packets; frame(s) {sorted(remaining)} are missing")
