"""A video request as images: its sampled frames become image entries of the request (one `<image>`
tag, one content key and one tile group each), decoded only when the vision-feature cache lacks them.

`sample_video` reads the header and the packet index (engine/video.py probe: nothing decoded past
frame 0) and picks the frames with the cards' get_index; a `VideoFrame` names one of them by the
video's bytes and its frame number. `decode_frames` turns the frames of a list of image entries into
RGB images, decoding each video once for all its frames the list holds. The question gets the
cards' `Frame1: <image>\\n…` prefix from engine/prompt.py video_question.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from engine.video import VideoError, VideoInfo, VideoLimits, frame_tiles, probe, read_frames, sample_indices, video_bytes


class EncodedVideo:
    """A video's bytes, shared by its frames. Its digest is computed on first use, once: the content
    keys need it (preprocess, Pipeline); the vision model, which gets the keys, decodes without it."""

    def __init__(self, data: bytes, limits: VideoLimits):
        self.data, self.limits = data, limits

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True, slots=True, eq=False)
class VideoFrame:
    video: EncodedVideo
    index: int  # decord's frame number


@dataclass(frozen=True, slots=True)
class SampledVideo:
    info: VideoInfo
    frames: list[VideoFrame]  # [num_segments], in time order (a frame may repeat in a short video)


def sample_video(video, num_segments: int = 8, bound=None, limits: VideoLimits = VideoLimits()) -> SampledVideo:
    """A path or encoded bytes -> the frames the cards' load_video would take, not decoded yet."""
    data = video_bytes(video, limits)
    info = probe(data, limits)
    return SampledVideo(info, video_frames(data, sample_indices(info, num_segments, bound, limits), limits))


def video_frames(data: bytes, indices, limits: VideoLimits) -> list[VideoFrame]:
    """Frames named by number (also what the serving path passes from preprocess to the vision model)."""
    video = EncodedVideo(data, limits)
    return [VideoFrame(video, int(i)) for i in indices]


def frame_tile_counts(sampled: SampledVideo, max_total_tiles: int | None = None, **tiling) -> list[int]:
    """Tiles of each sampled frame (all frames have the video's size), refused over max_total_tiles.
    tiling: frame_tiles' input_size, max_num, min_num, use_thumbnail."""
    # -> [num_segments]
    counts = [frame_tiles(sampled.info, **tiling)] * len(sampled.frames)
    if max_total_tiles is not None and sum(counts) > max_total_tiles:
        raise VideoError(
            f"the video's {len(counts)} frames need {sum(counts)} tiles ({counts[0]} per frame); this deployment "
            f"allows at most {max_total_tiles} per request (lower max_tiles or num_frames)"
        )
    return counts


def decode_frames(images: list) -> list:
    """images: image entries (what engine/preprocess.py load_images takes, or VideoFrame) -> the same
    list with every VideoFrame replaced by its RGB PIL image; each video is decoded once."""
    by_video: dict[int, list[int]] = {}
    for position, image in enumerate(images):
        if isinstance(image, VideoFrame):
            by_video.setdefault(id(image.video), []).append(position)
    out = list(images)
    for positions in by_video.values():
        video = images[positions[0]].video
        decoded = read_frames(video.data, [images[p].index for p in positions], video.limits)
        for position, frame in zip(positions, decoded):
            out[position] = frame
    return out
