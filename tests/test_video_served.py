"""Video requests through the served ensemble: preprocess reads the video's header and packet index
(tile counts, limits, the Frame{i}: <image> prompt), the vision model decodes the sampled frames
behind its feature cache. The reply equals Pipeline's (which equals transformers':
tests/test_video_generation.py); bad videos get their own errors while good requests complete."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest

from client.triton_client import InternVLClient, ServerError
from engine.pipeline import Pipeline
from tests.repository_checks import metric_value
from tests.video_files import encode, frames

QUESTION = "What is happening in the video?"
MAX_NEW = 12


@pytest.fixture(scope="module")
def pipe(tiny):
    with Pipeline.from_pretrained(tiny) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "wide": encode(root / "wide.mp4", frames(40, 320, 180, seed=31), 25).read_bytes(),
        "tall": encode(root / "tall.webm", frames(30, 180, 320, seed=32), 24, "libvpx-vp9").read_bytes(),
    }


def _video(data: bytes, num_frames: int | None = None) -> dict:
    fields = {"video_bytes": ("BYTES", [data])}
    if num_frames is not None:
        fields["num_frames"] = ("INT32", [num_frames])
    return fields


@pytest.mark.parametrize("name,num_frames,max_tiles", [("wide", None, None), ("tall", 4, 2)])
def test_served_video_reply_equals_the_pipeline(server, pipe, videos, name, num_frames, max_tiles):
    reply = InternVLClient(server.grpc_url).generate(QUESTION, max_tokens=MAX_NEW, max_tiles=max_tiles, extra=_video(videos[name], num_frames))
    expected = pipe.generate(
        QUESTION, video=videos[name], num_segments=num_frames or 8, max_tiles_per_frame=max_tiles or 1, max_new_tokens=MAX_NEW
    )
    assert (reply.text, reply.prompt_tokens) == (expected.text, expected.prompt_tokens)


def test_a_base64_video_over_http_and_its_repeat_over_grpc_served_from_the_feature_cache(server, videos):
    names = ("internvl_vision_cache_hits_total", "internvl_vision_cache_misses_total", "internvl_vision_encoded_tiles_total")
    data = videos["wide"][:-1] + bytes([videos["wide"][-1] ^ 1])  # bytes no other test sends
    http = InternVLClient(server.http_url, protocol="http")
    first = http.generate(QUESTION, max_tokens=MAX_NEW, extra=_video(base64.b64encode(data).decode(), 6))
    hits, misses, tiles = (metric_value(server, n) for n in names)
    again = InternVLClient(server.grpc_url).generate(QUESTION, max_tokens=MAX_NEW, extra=_video(data, 6))
    assert [metric_value(server, n) for n in names] == [hits + 6, misses, tiles]  # no frame decoded or encoded
    assert (again.text, again.prompt_tokens) == (first.text, first.prompt_tokens)


BAD = {  # name: (fields, image_bytes, error)
    "corrupt": (_video(b"\x00\x01" * 500), [], "VideoError: cannot read video: not an MP4/MOV"),
    "zero_frames": ("wide", 0, "VideoError: the number of frames to sample"),
    "too_many_frames": ("wide", 33, r"must be an integer in \[1, 32\]"),
    "too_many_tiles": ("wide", 32, "need 96 tiles"),
}


def test_bad_video_requests_get_their_own_errors_while_good_ones_complete(server, pipe, videos):
    client = InternVLClient(server.grpc_url)

    def send(case):
        if case == "good":
            return client.generate(QUESTION, max_tokens=MAX_NEW, extra=_video(videos["tall"], 3)).text
        if case == "with_image":
            return client.generate(QUESTION, [videos["wide"]], max_tokens=2, extra=_video(videos["wide"]))
        fields, num_frames, _ = BAD[case]
        extra = fields if isinstance(fields, dict) else _video(videos[fields], num_frames)
        return client.generate(QUESTION, max_tokens=2, max_tiles=2 if case == "too_many_tiles" else None, extra=extra)

    cases = ["good", *BAD, "with_image", "good"]
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {case + str(i): pool.submit(send, case) for i, case in enumerate(cases)}
    expected = pipe.generate(QUESTION, video=videos["tall"], num_segments=3, max_new_tokens=MAX_NEW).text
    for key, future in futures.items():
        case = key.rstrip("0123456789")
        if case == "good":
            assert future.result() == expected
            continue
        with pytest.raises(ServerError, match=BAD[case][2] if case in BAD else "image_bytes or video_bytes, not both"):
            future.result()


def test_the_build_writes_the_video_limits_into_both_models(server):
    for model in ("preprocess", "vision_encoder"):
        config = (server.repository / "model_repository" / model / "config.pbtxt").read_text(encoding="utf-8")
        for key, value in (("max_video_frames", "32"), ("max_video_seconds", "600.0"), ("max_video_pixels", "8294400")):
            assert f'key: "{key}" value: {{ string_value: "{value}" }}' in config
