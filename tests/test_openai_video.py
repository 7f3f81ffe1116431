"""A `video_url` content part through the OpenAI-compatible server: the conversation (the cards'
Frame{i}: <image> prefix in the video's turn, so later turns find it in the history), the fields
sent to Triton (video_bytes, num_frames), its errors and byte limit against a fake Triton; live, the
replies equal Pipeline's."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from engine.prompt import frame_prompt
from engine.protocol import DEFAULT_NUM_FRAMES
from openai_api.server import running_server
from openai_api.settings import Settings
from tests.test_openai_api import LIMITS, PNG, SETTINGS, FakeBackend, _api_error, _conversation, _data_uri, _image, _post, _replies
from tests.test_openai_api import pipe  # noqa: F401
from tests.video_files import encode, frames

MAX_NEW = 12
SMALL = 300_000  # the fake build's max_request_bytes


def _video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def _video_uri(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> bytes:
    return encode(tmp_path_factory.mktemp("videos") / "v.mp4", frames(30, 320, 180, seed=41), 25).read_bytes()


def test_the_videos_turn_gets_one_frame_tag_per_frame_and_history_keeps_them():
    conv = _conversation([
        {"role": "user", "content": [_video("AAAA"), {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "A panda eats."},
        {"role": "user", "content": "Describe it in detail."},
    ])  # fmt: skip
    assert conv.history == [(frame_prompt(DEFAULT_NUM_FRAMES) + "What happens?", "A panda eats.")]
    assert conv.question == "Describe it in detail." and conv.images == []
    assert conv.video.url.url == "AAAA" and conv.video.where == "messages[0].content[0].video_url"
    tagged = "".join(f"F{i}: <image>\n" for i in range(DEFAULT_NUM_FRAMES)) + "Why?"
    assert _conversation([{"role": "user", "content": [_video("AAAA"), {"type": "text", "text": tagged}]}]).question == tagged


@pytest.mark.parametrize(
    "content, message",
    [([_video("AAAA"), _image("AAAA")], "images and a video"), ([_video("AAAA"), _video("BBBB")], "one video"),
     ([_video("AAAA"), {"type": "text", "text": "<image>\nWhy?"}], "one tag per frame")],
)  # fmt: skip
def test_more_than_one_video_images_with_a_video_and_wrong_tags_are_400(content, message):
    error = _api_error(_conversation, [{"role": "user", "content": content}])
    assert error.status == 400 and message in error.message


def test_a_video_with_images_in_another_turn_is_400():
    messages = [
        {"role": "user", "content": [_image("AAAA"), {"type": "text", "text": "This?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [_video("AAAA"), {"type": "text", "text": "And this?"}]},
    ]
    assert "images or one video" in _api_error(_conversation, messages).message


class SmallBuild(FakeBackend):
    async def preprocess_parameters(self):
        return {"checkpoint": "/models/tiny", **LIMITS, "max_request_bytes": str(SMALL)}


@pytest.fixture(scope="module")
def fake():
    backend = SmallBuild()
    with running_server(SETTINGS, backend) as url:
        backend.url = url
        yield backend


def _ask_fake(fake, content: list) -> tuple[int, dict]:
    fake.script = _replies(("Hi", ""))
    status, body = _post(fake.url, {"model": "tiny", "messages": [{"role": "user", "content": content}]})
    return status, json.loads(body)


def test_the_video_reaches_triton_as_video_bytes_with_num_frames(fake, video):
    status, _ = _ask_fake(fake, [{"type": "text", "text": "What happens?"}, _video(_video_uri(video))])
    sent = {k: v for k, (_, v) in fake.requests[-1].items()}
    assert status == 200 and sent["video_bytes"] == [video] and sent["num_frames"] == [DEFAULT_NUM_FRAMES]
    assert sent["text_input"] == [frame_prompt(DEFAULT_NUM_FRAMES) + "What happens?"] and "image_bytes" not in sent


def test_a_video_up_to_the_builds_bytes_passes_the_body_limit_and_a_larger_one_is_400(fake):
    # The default body limit counts the build's max_request_bytes as base64: a video of that size fits.
    status, _ = _ask_fake(fake, [_video(_video_uri(b"v" * SMALL))])
    assert status == 200 and fake.requests[-1]["video_bytes"][1] == [b"v" * SMALL]
    status, body = _ask_fake(fake, [_video(_video_uri(b"v" * (SMALL + 1)))])
    assert status == 400 and f"allows {SMALL} per request" in body["error"]["message"] and "video_url" in body["error"]["message"]


@pytest.mark.parametrize(
    "url, message",
    [("data:video/mp4;base64,@@@", "invalid base64 video data"), ("data:video/mp4,raw", "data:video/mp4;base64"),
     ("https://example.com/v.mp4", "remote video URLs are refused"), ("file:///etc/passwd", "unsupported URL scheme")],
)  # fmt: skip
def test_bad_or_remote_video_urls_are_400_naming_the_part(fake, url, message):
    status, body = _ask_fake(fake, [_video(url)])
    error = body["error"]
    assert status == 400 and message in error["message"] and error["param"] == "messages[0].content[0].video_url"


@pytest.fixture(scope="module")
def api(server):
    with running_server(Settings(host="127.0.0.1", port=0, triton_url=server.grpc_url)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        client.served = client.models.list().data[0].id
        yield client


def _chat(api, messages: list) -> str:
    return api.chat.completions.create(model=api.served, messages=messages, max_tokens=MAX_NEW).choices[0].message.content


def test_live_video_turn_and_follow_up_equal_the_pipeline(api, pipe, video):  # noqa: F811
    first, history = pipe.chat("What happens?", video=video, max_new_tokens=MAX_NEW, return_history=True)
    follow_up = pipe.chat("Describe it in detail.", video=video, history=history, max_new_tokens=MAX_NEW)
    turn = {"role": "user", "content": [_video(_video_uri(video)), {"type": "text", "text": "What happens?"}]}
    assert _chat(api, [turn]) == first
    assert _chat(api, [turn, {"role": "assistant", "content": first}, {"role": "user", "content": "Describe it in detail."}]) == follow_up
    image_turn = {"role": "user", "content": [_image(_data_uri(PNG)), {"type": "text", "text": "What happens?"}]}
    with pytest.raises(openai.BadRequestError, match="images or one video"):
        _chat(api, [image_turn, {"role": "assistant", "content": first}, turn])
