"""engine/video.py against the cards' video input (tests/reference_video.py: their get_index and
load_video on decord, the reader they use) on videos encoded here with PyAV."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path
from unittest import mock

import av
import decord
import numpy as np
import pytest

from engine import video
from engine.prompt import frame_prompt
from engine.video import VideoError, VideoLimits, frame_tiles, get_index, load_video, probe, read_frames
from tests import reference_video
from tests.video_files import audio_only, encode, frames, remux_every_packet_as_keyframe

# name: (codec, pix_fmt, fps, frames, width, height, encoder options)
VIDEOS = {
    "h264_bframes.mp4": ("libx264", "yuv420p", Fraction(30000, 1001), 45, 320, 180, {"bf": "2", "g": "12"}),
    "mpeg4.avi": ("mpeg4", "yuv420p", 25, 40, 160, 96, None),
    "vp9.webm": ("libvpx-vp9", "yuv420p", 24, 30, 128, 72, None),
    "vp8.webm": ("libvpx", "yuv420p", 15, 25, 96, 160, None),
    "ffv1_lossless.mkv": ("ffv1", "bgr0", 10, 20, 96, 64, None),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (file, the RGB frames written into it)."""
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for seed, (name, (codec, pix_fmt, fps, count, width, height, options)) in enumerate(VIDEOS.items()):
        pixels = frames(count, width, height, seed)
        out[name] = encode(root / name, pixels, fps, codec, pix_fmt, options), pixels
    pixels = frames(24, 160, 96, seed=10)
    out["rotated.mp4"] = encode(root / "rotated.mp4", pixels, 30, rotation=90), pixels
    out["with_audio.mp4"] = encode(root / "with_audio.mp4", pixels, 30, audio=True), pixels
    out["mpeg2.ts"] = encode(root / "mpeg2.ts", pixels, 25, "mpeg2video"), pixels
    out["bframes.avi"] = encode(root / "bframes.avi", pixels, 25, "mpeg4", options={"bf": "2", "g": "6"}), pixels
    mpeg4 = encode(root / "mpeg4.mp4", pixels, 25, "mpeg4", options={"bf": "2", "g": "12"})
    out["false_keyframes.mp4"] = remux_every_packet_as_keyframe(mpeg4, root / "false_keyframes.mp4"), pixels
    return out


def _decord(path: Path) -> decord.VideoReader:
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)


def _every_frame(path: Path) -> list[np.ndarray]:
    # the whole video decoded in order: the frames decord's vr[i] names, [H, W, 3] each
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("fps", [1.0, 10.0, 24000 / 1001, 25.0, 30000 / 1001, 30.0, 60000 / 1001, 60.0])
def test_indices_equal_the_cards_get_index_over_fps_lengths_and_bounds(fps):
    bounds = [None, (0, 1), (0.5, 3.2), (2.0, 2.0), (-1, 1000), (1.5, 99999), (0.25, 0.3), (7.77, 12.1)]
    for max_frame, bound, num_segments in itertools.product([0, 1, 7, 31, 99, 1234], bounds, [1, 3, 8, 32]):
        expected = reference_video.get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
        ours = get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
        assert ours.tolist() == expected.tolist(), (fps, max_frame, bound, num_segments)


def test_sample_indices_refuse_bounds_outside_the_video_and_bad_segment_counts(videos):
    info = probe(videos["mpeg4.avi"][0])  # 40 frames at 25 fps: 1.6 s
    assert video.sample_indices(info, 8, (-5, 100)).tolist() == reference_video.get_index((-5, 100), 25.0, 39, 0, 8).tolist()
    assert video.sample_indices(info, 4, (1.5, 1.5)).tolist() == [38] * 4
    for bound in [(1.7, 3.0), (-3, -1), (1.0, 0.5), (float("nan"), 1)]:
        with pytest.raises(VideoError, match="bound"):
            video.sample_indices(info, 8, bound)
    for num_segments in [0, 33, 2.5]:
        with pytest.raises(VideoError, match="frames to sample"):
            video.sample_indices(info, num_segments)
    expected = reference_video.get_index(None, 25.0, 39, 0, 40).tolist()
    assert video.sample_indices(info, 40, limits=VideoLimits(max_frames=40)).tolist() == expected


@pytest.mark.parametrize("name", [*VIDEOS, "rotated.mp4", "with_audio.mp4"])
def test_probe_reports_what_decord_reports(videos, name):
    path, _ = videos[name]
    vr = _decord(path)
    info = probe(path)
    assert info.fps == vr.get_avg_fps() and info.num_frames == len(vr)
    assert (info.height, info.width, 3) == vr[0].shape
    assert info.duration == len(vr) / vr.get_avg_fps()
    assert probe(path.read_bytes()) == info


def test_rotated_video_frames_are_turned_as_decord_turns_them(videos):
    path, _ = videos["rotated.mp4"]
    info = probe(path)
    assert (info.rotation, info.width, info.height) == (1, 96, 160)  # 160×96 written, a quarter turn shown
    [image] = read_frames(path, [5])
    assert np.array_equal(np.asarray(image), _decord(path)[5].asnumpy())


@pytest.mark.parametrize("name", [*VIDEOS, "rotated.mp4", "with_audio.mp4"])
def test_sampled_frames_equal_decords_in_the_cards_order(videos, name):
    path, _ = videos[name]
    vr = _decord(path)
    for num_segments, bound in [(8, None), (32, None), (5, (0.2, 0.9))]:
        indices = reference_video.get_index(bound, vr.get_avg_fps(), len(vr) - 1, 0, num_segments)
        images = read_frames(path, indices)
        assert [im.mode for im in images] == ["RGB"] * len(indices)
        for image, i in zip(images, indices):
            assert np.array_equal(np.asarray(image), vr[i].asnumpy()), (name, i)


def test_lossless_frames_equal_the_frames_written(videos):
    path, pixels = videos["ffv1_lossless.mkv"]
    indices = [19, 0, 7, 7, 12]
    for image, i in zip(read_frames(path, indices), indices):
        assert np.array_equal(np.asarray(image), pixels[i])
    assert not np.array_equal(pixels[7], pixels[12])


SEEKS = [("h264_bframes.mp4", True), ("vp9.webm", True), ("bframes.avi", None), ("mpeg2.ts", False), ("false_keyframes.mp4", False)]


@pytest.mark.parametrize("name,seeks", SEEKS)
def test_seeking_decodes_the_same_frames_as_decoding_everything(videos, name, seeks):
    # Where a seek does not land where the index says (MPEG-TS; an index that calls every frame a
    # keyframe), the frames are decoded from the start; seeks=None: either. decord's own seeks
    # return other frames in these files.
    path, _ = videos[name]
    everything = _every_frame(path)
    indices = [len(everything) - 1, 0, 3, 2, 11, 11, len(everything) // 2, 1]
    with mock.patch.object(video, "_decode_sequential", wraps=video._decode_sequential) as sequential:
        images = read_frames(path, indices)
    assert seeks is None or sequential.called != seeks
    for image, i in zip(images, indices):
        assert np.array_equal(np.asarray(image), everything[i]), (name, i)


@pytest.mark.parametrize("max_num,num_segments,bound", [(1, 8, None), (6, 3, None), (1, 32, None), (12, 2, (0.3, 1.0))])
def test_tiles_equal_the_cards_load_video(videos, max_num, num_segments, bound):
    for name in ["h264_bframes.mp4", "vp8.webm", "rotated.mp4"]:
        path, _ = videos[name]
        expected, expected_patches = reference_video.load_video(str(path), bound, 448, max_num, num_segments)
        ours, patches = load_video(path, bound, 448, max_num, num_segments)
        assert patches == expected_patches
        assert patches == [frame_tiles(probe(path), max_num=max_num)] * num_segments
        assert ours.shape == tuple(expected.shape) and np.abs(ours - expected.numpy()).max() <= 1e-6
        raw, _ = load_video(path, bound, 448, max_num, num_segments, normalize=False)
        assert raw.dtype == np.uint8 and raw.shape == ours.shape


def test_two_videos_give_different_tiles(videos):
    a, _ = load_video(videos["h264_bframes.mp4"][0], num_segments=4)
    b, _ = load_video(videos["vp9.webm"][0], num_segments=4)
    assert a.shape == b.shape and np.abs(a - b).max() > 0.5


def test_frame_prompt_is_the_cards_video_prefix():
    for n in [1, 2, 8, 32]:
        assert frame_prompt(n) + "Why?" == reference_video.video_question([1] * n, "Why?")
    assert frame_prompt(2) == "Frame1: <image>\nFrame2: <image>\n"


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


def _unknown_codec(path: Path) -> bytes:
    # the Matroska FourCC of FFV1 replaced by one no decoder knows
    data = path.read_bytes()
    assert data.count(b"FFV1") == 1
    return data.replace(b"FFV1", b"ZZZZ")


def test_corrupt_empty_and_unsupported_inputs_are_refused_clearly(videos, tmp_path):
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n/etc/hostname\n#EXT-X-ENDLIST\n"
    cases = {
        b"": "empty",
        b"not a video at all" * 50: "not an MP4/MOV, MKV/WebM, AVI or MPEG-TS file",
        _truncated(videos["h264_bframes.mp4"][0]): "cannot read video",  # its index (moov) is at the end
        png.getvalue(): "not an MP4/MOV",
        playlist: "not an MP4/MOV",  # an HLS playlist would make FFmpeg open the file it names
        audio_only(tmp_path / "silence.m4a").read_bytes(): "no video stream",
        _unknown_codec(videos["ffv1_lossless.mkv"][0]): "unsupported video codec",
    }
    for data, message in cases.items():
        for call in (probe, lambda d: read_frames(d, [0]), lambda d: load_video(d, num_segments=2)):
            with pytest.raises(VideoError, match=message):
                call(data)
    with pytest.raises(VideoError, match="cannot open video file"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(TypeError, match="path or encoded bytes"):
        probe(np.zeros(4))


def test_limits_refuse_large_long_and_oversized_videos_before_decoding(videos):
    path, _ = videos["h264_bframes.mp4"]  # 45 frames at 29.97 fps, 320×180
    size = path.stat().st_size
    with pytest.raises(VideoError, match=f"video is {size} bytes; this deployment allows {size - 1}"):
        probe(path, VideoLimits(max_bytes=size - 1))
    with pytest.raises(VideoError, match=f"video is {size} bytes"):
        probe(path.read_bytes(), VideoLimits(max_bytes=size - 1))
    assert probe(path, VideoLimits(max_bytes=size)).num_frames == 45
    with pytest.raises(VideoError, match="longer than 1.4 s"):
        probe(path, VideoLimits(max_seconds=1.4))
    assert probe(path, VideoLimits(max_seconds=1.51)).num_frames == 45  # 45 / 29.97 = 1.5015 s
    with pytest.raises(VideoError, match="320×180 = 57600 pixels; this deployment allows 57599"):
        read_frames(path, [0], VideoLimits(max_pixels=57599))
    with pytest.raises(VideoError, match="frames to sample"):
        load_video(path, num_segments=9, limits=VideoLimits(max_frames=8))
    with pytest.raises(VideoError, match=r"frame indices must be in \[0, 45\)"):
        read_frames(path, [3, 45])
    with pytest.raises(ValueError, match="max_frames"):
        VideoLimits(max_frames=0)
