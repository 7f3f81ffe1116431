"""OpenAI chat messages -> the ensemble's conversation inputs (text_input, history, system_prompt,
the images in order and the tile budget).

Image placement follows vLLM: a user turn whose text has no `<image>` tag gets one `<image>\\n` per
image part, in order, before its text; a turn whose text has tags uses them as written, and their
count must equal the turn's image parts. Earlier turns keep their images: their tags stay in the
history and every image of the conversation is sent, in the order of the tags.

A video (one `video_url` part in the whole conversation, and no images with it) becomes the
ensemble's video_bytes with num_frames frames; the text of its turn gets the cards'
`Frame1: <image>\\n…` prefix (a turn whose text has tags needs one per frame), so that later turns
find the frames' tags in the history.

Tile budget (`detail`): "low" asks for one tile per image; "high", "auto" or no detail leave the
checkpoint's own maximum. The ensemble takes one budget per request, so when images disagree the
smallest wins: one "low" image makes every image of the request one tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.prompt import IMAGE_PLACEHOLDER as IMAGE_TAG, frame_prompt
from engine.protocol import DEFAULT_NUM_FRAMES
from openai_api.errors import bad_request
from openai_api.schema import ImagePart, ImageURL, Message, TextPart, VideoPart, VideoURL

NUM_FRAMES = DEFAULT_NUM_FRAMES  # sent as num_frames with every video: its turn's text holds one tag per frame


@dataclass(frozen=True)
class ImageRef:
    url: ImageURL
    param: str  # where it came from, e.g. messages[2].content[1]
    kind = "image"

    @property
    def where(self) -> str:
        """The field its errors name."""
        return f"{self.param}.image_url"


@dataclass(frozen=True)
class VideoRef:
    url: VideoURL
    param: str
    kind = "video"

    @property
    def where(self) -> str:
        return f"{self.param}.video_url"


@dataclass
class Conversation:
    question: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system_prompt: str | None = None
    images: list[ImageRef] = field(default_factory=list)
    video: VideoRef | None = None

    @property
    def max_tiles(self) -> int | None:
        return 1 if any(image.url.detail == "low" for image in self.images) else None


def build_conversation(messages: list[Message]) -> Conversation:
    system_prompt = None
    if messages and messages[0].role == "system":
        system_prompt = _text_only(messages[0], 0)
        messages = messages[1:]
        offset = 1
    else:
        offset = 0
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise bad_request(
                f"messages[{i + offset}] has role {message.role!r}, expected {expected!r}: after an optional leading "
                "system message, turns must alternate user / assistant and end with a user turn",
                "messages",
            )
    if not messages or messages[-1].role != "user":
        raise bad_request("the last message must be a user turn", "messages")

    images: list[ImageRef] = []
    videos: list[VideoRef] = []
    users = [_user_text(m, i + offset, images, videos) for i, m in enumerate(messages) if m.role == "user"]
    assistants = [_text_only(m, i + offset) for i, m in enumerate(messages) if m.role == "assistant"]
    if videos and (images or len(videos) > 1):
        raise bad_request("a conversation has images or one video (one video_url part), not more", "messages")
    return Conversation(users[-1], list(zip(users[:-1], assistants)), system_prompt, images, videos[0] if videos else None)


def _user_text(message: Message, index: int, images: list[ImageRef], videos: list[VideoRef]) -> str:
    """The turn's text with its image (or frame) tags; appends the turn's images and video."""
    content = message.content
    if content is None:
        raise bad_request(f"messages[{index}] (user) has no content", f"messages[{index}].content")
    if isinstance(content, str):
        texts, parts, video_parts = [content], [], []
    else:
        texts = [p.text for p in content if isinstance(p, TextPart)]
        parts = [(j, p) for j, p in enumerate(content) if isinstance(p, ImagePart)]
        video_parts = [(j, p) for j, p in enumerate(content) if isinstance(p, VideoPart)]
    text = "\n".join(texts)
    if video_parts:
        if parts:
            raise bad_request(f"messages[{index}] has images and a video; a conversation has one or the other", f"messages[{index}].content")
        videos.extend(VideoRef(p.video_url, f"messages[{index}].content[{j}]") for j, p in video_parts)
        return _video_text(text, index)
    tags = text.count(IMAGE_TAG)
    if tags == 0:
        text = f"{IMAGE_TAG}\n" * len(parts) + text
    elif tags != len(parts):
        raise bad_request(
            f"messages[{index}] has {tags} {IMAGE_TAG} tag(s) in its text but {len(parts)} image part(s); "
            f"write one tag per image or none (then each image goes before the text)",
            f"messages[{index}].content",
        )
    images.extend(ImageRef(p.image_url, f"messages[{index}].content[{j}]") for j, p in parts)
    return text


def _video_text(text: str, index: int) -> str:
    tags = text.count(IMAGE_TAG)
    if tags == 0:
        return frame_prompt(NUM_FRAMES) + text
    if tags != NUM_FRAMES:
        raise bad_request(
            f"messages[{index}] has a video and {tags} {IMAGE_TAG} tag(s) in its text; write one tag per frame "
            f"({NUM_FRAMES}) or none (then Frame1: {IMAGE_TAG} … Frame{NUM_FRAMES}: {IMAGE_TAG} go before the text)",
            f"messages[{index}].content",
        )
    return text


def _text_only(message: Message, index: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        if not isinstance(part, TextPart):
            raise bad_request(
                f"messages[{index}] ({message.role}) may only hold text, part {j} is {part.type!r}",
                f"messages[{index}].content[{j}]",
            )
    return "\n".join(p.text for p in content)
