"""model.chat() prompt construction, tokenized with the prompt-table convention.

Each `<image>` in the rendered conversation becomes `<img>` + Q·tiles context tokens + `</img>`.
The context positions carry fake ids `vocab_size + k` (k runs over all images of the request), so
the LLM reads their embeddings from row k of the prompt table (TensorRT-LLM's convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.config import ModelConfig
from engine.reasoning import THINK_START
from engine.templates import Turn
from engine.tokenizer import TextTokenizer

IMAGE_PLACEHOLDER = "<image>"


def frame_prompt(num_frames: int) -> str:
    """The cards' video prefix: `Frame1: <image>\\nFrame2: <image>\\n…`, one tag per frame."""
    return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))


def video_question(question: str, num_frames: int, first_turn: bool) -> str:
    """The cards' first video turn: `Frame1: <image>\\n…FrameN: <image>\\n` + question, unless the
    question places its own tags; later turns find the tags in the history."""
    if first_turn and IMAGE_PLACEHOLDER not in question:
        return frame_prompt(num_frames) + question
    return question


class PromptError(ValueError):
    """The request's text and images do not fit together."""


@dataclass(frozen=True, slots=True)
class Prompt:
    input_ids: np.ndarray  # int32 [L]; image-context positions hold vocab_size + k
    num_image_tokens: int  # T·Q: rows of the prompt table this prompt reads
    question: str  # as entered in the history (with the `<image>\n` tags prepended to an untagged first turn)
    opens_reasoning: bool = False  # the prompt ends in <think> (R1-style templates): the reply starts inside it


class PromptBuilder:
    def __init__(self, config: ModelConfig, tokenizer: TextTokenizer):
        self._template = config.template
        self._system_message = config.system_message
        self._tokens_per_tile = config.vision.tokens_per_tile
        self._vocab_size = config.text.vocab_size
        self._img_start, self._img_end = config.img_start_id, config.img_end_id
        self._tokenizer = tokenizer

    def render(
        self, question: str, num_images: int, history: Sequence[Turn] | None, system_message: str | None = None
    ) -> tuple[str, str]:
        """-> (query text with `<image>` placeholders, question as it enters the history).

        system_message None means the checkpoint's (e.g. R1_SYSTEM_PROMPT switches on thinking mode).
        """
        if history is None and num_images and IMAGE_PLACEHOLDER not in question:
            # model.chat prepends one tag; with several images the cards' scripts prepend one per
            # image (Skywork-R1V3's inference script: "<image>\n" * len(images) + question)
            question = f"{IMAGE_PLACEHOLDER}\n" * num_images + question
        system = self._system_message if system_message is None else system_message
        query = self._template.render(system, list(history or ()), question)
        return query, question

    def build(
        self,
        question: str,
        num_tiles: Sequence[int],
        history: Sequence[Turn] | None = None,
        system_message: str | None = None,
    ) -> Prompt:
        # num_tiles: [N] tiles per image, in the order their `<image>` tags appear
        query, question = self.render(question, len(num_tiles), history, system_message)
        pieces = query.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(num_tiles):
            raise PromptError(
                f"the conversation has {len(pieces) - 1} {IMAGE_PLACEHOLDER} tag(s) but the request "
                f"has {len(num_tiles)} image(s); each image needs exactly one tag"
            )
        tok = self._tokenizer
        ids: list[int] = list(tok.prefix_ids) + tok.encode(pieces[0])
        next_fake = self._vocab_size
        for tiles, piece in zip(num_tiles, pieces[1:]):
            count = tiles * self._tokens_per_tile
            ids.append(self._img_start)
            ids.extend(range(next_fake, next_fake + count))
            ids.append(self._img_end)
            ids.extend(tok.encode(piece))
            next_fake += count
        ids.extend(tok.suffix_ids)
        return Prompt(
            input_ids=np.asarray(ids, dtype=np.int32),
            num_image_tokens=next_fake - self._vocab_size,
            question=question,
            opens_reasoning=query.rstrip().endswith(THINK_START),
        )
