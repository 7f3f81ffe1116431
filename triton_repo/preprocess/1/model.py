"""Triton adapter: image bytes (or a video's sampled frames) + prompt text → tile counts from headers
(pixel_values where preprocess decodes: GPU), input_ids with fake ids, stop words."""

import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.config import ModelConfig
from engine.image_key import ImageKeys
from engine.preprocess import load_images, tile_counts
from engine.prompt import PromptBuilder, video_question
from engine.protocol import (
    DEFAULT_NUM_FRAMES,
    RequestError,
    check_images,
    image_from_element,
    parse_history,
    stop_words_list,
    video_from_element,
)
from engine.reasoning import R1_SYSTEM_PROMPT
from engine.tokenizer import TextTokenizer
from engine.video import VideoLimits
from engine.video_frames import decode_frames, frame_tile_counts, sample_video
from triton_repo import allocator, pb


class TritonPythonModel:
    def initialize(self, args):
        allocator.stub_settings()  # before this stub allocates anything big
        config, params = pb.model_parameters(args)
        self.dtypes = pb.output_dtypes(config)
        self.config = ModelConfig.from_pretrained(params["checkpoint"])
        self.tokenizer = TextTokenizer(params["checkpoint"])
        self.prompts = PromptBuilder(self.config, self.tokenizer)
        self.image_keys = ImageKeys.of(self.config)
        self.max_tiles_per_request = int(params["max_tiles_per_request"])
        self.max_input_len = int(params["max_input_len"])
        self.max_images = int(params["max_images"])
        self.max_image_pixels = int(params["max_image_pixels"])
        self.max_request_bytes = int(params["max_request_bytes"])
        self.decodes_images = params["decodes_images"] == "true"
        self.video_limits = VideoLimits.from_parameters(params)

    def execute(self, requests):
        return pb.answer_each(requests, self._preprocess)

    def _preprocess(self, request):
        c = self.config
        question = pb.scalar(request, "text_input")
        images = [image_from_element(e, i) for i, e in enumerate(pb.strings(request, "image_bytes"))]
        check_images(images, self.max_images, self.max_request_bytes)
        history = parse_history(pb.scalar(request, "history", b"") or None)
        video = pb.strings(request, "video_bytes")
        if video:  # its sampled frames become the request's images
            if images:
                raise RequestError("a request has image_bytes or video_bytes, not both")
            sampled = sample_video(video_from_element(video[0]), int(pb.scalar(request, "num_frames", DEFAULT_NUM_FRAMES)), limits=self.video_limits)
            images = sampled.frames
            question = video_question(question, len(images), history is None)
            max_tiles = c.tile_budget(pb.scalar(request, "max_tiles", 1))  # per frame, as the cards' max_num=1
        else:
            max_tiles = c.tile_budget(pb.scalar(request, "max_tiles", None), pb.scalar(request, "max_total_tiles", None), len(images))
        system_prompt = pb.scalar(request, "system_prompt", "") or None
        if system_prompt is None and pb.scalar(request, "enable_thinking", False):  # seed card 004's switch
            system_prompt = R1_SYSTEM_PROMPT
        size = c.vision.image_size
        tiling = dict(input_size=size, max_num=max_tiles, use_thumbnail=c.use_thumbnail, min_num=c.min_num)
        limits = dict(max_total_tiles=self.max_tiles_per_request, max_pixels=self.max_image_pixels)
        pixel_values = np.zeros((0, 3, size, size), np.uint8)
        if video:  # every frame has the video's size: tiles from its header
            num_tiles = frame_tile_counts(sampled, self.max_tiles_per_request, **tiling)
        if images and self.decodes_images:
            pixel_values, num_tiles = load_images(decode_frames(images), normalize=False, **tiling, **limits)
        elif not video:  # the vision model decodes what its feature cache does not hold
            num_tiles = tile_counts(images, **tiling, **limits)
        prompt = self.prompts.build(question, num_tiles, history, system_prompt)
        if len(prompt.input_ids) > self.max_input_len:
            raise ValueError(f"the prompt has {len(prompt.input_ids)} tokens; this deployment allows {self.max_input_len}")
        stops = [pb.utf8(w, "stop_words") for w in pb.strings(request, "stop_words")]
        d = self.dtypes
        return pb_utils.InferenceResponse(
            [
                pb.tensor("pixel_values", pixel_values, d["pixel_values"]),
                pb.tensor("input_ids", prompt.input_ids, d["input_ids"]),
                pb.tensor("input_lengths", [len(prompt.input_ids)], d["input_lengths"]),
                pb.tensor("end_id", [c.stop_token_id], d["end_id"]),
                pb.tensor("stop_words_list", stop_words_list(self.tokenizer, stops), d["stop_words_list"]),
                pb.tensor("request_key", [uuid.uuid4().hex.encode()], d["request_key"]),
                pb.tensor("opens_reasoning", [prompt.opens_reasoning], d["opens_reasoning"]),
                pb.tensor("image_keys", [k.encode() for k in self.image_keys.keys(images, max_tiles)], d["image_keys"]),
                pb.tensor("image_tiles", num_tiles, d["image_tiles"]),
                pb.tensor("image_data", [] if self.decodes_images or video else images, d["image_data"]),
                pb.tensor("tile_budget", [max_tiles], d["tile_budget"]),
                pb.tensor("video_data", [sampled.frames[0].video.data] if video and not self.decodes_images else [], d["video_data"]),
                pb.tensor("frame_indices", [f.index for f in images] if video else [], d["frame_indices"]),
            ]
        )
