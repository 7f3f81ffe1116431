"""The in-process pipeline: preprocess → vision encoder → prompt-table LLM → detokenize.

`generate` is the one path; `stream` yields its text deltas as they come and `chat` returns its
text like the InternVL cards' `model.chat`. A request has images or a video, whose sampled frames
are its images (engine/video_frames.py). The Triton models wrap the same stages one per model.
Requests from several threads, or several open streams, run concurrently: the engine loop
(engine/llm/runner.py) batches them as the server does.
"""

from __future__ import annotations

import itertools
import queue
import weakref
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.detokenize import ReplyParts
from engine.flash import drop_compressed
from engine.image_features import ImageFeatureSource, RequestFeatures, RequestImages
from engine.image_key import ImageKeys
from engine.llm.engine import LLMEngine
from engine.llm.guided import GuideCompiler, tokenizer_info
from engine.llm.model import DecoderLM
from engine.llm.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from engine.llm.runner import EngineRunner
from engine.prompt import Prompt, PromptBuilder, video_question
from engine.protocol import DEFAULT_NUM_FRAMES, image_rows
from engine.reasoning import R1_SYSTEM_PROMPT
from engine.sampling_params import SamplingParams
from engine.templates import Turn
from engine.tokenizer import TextTokenizer
from engine.video import VideoLimits
from engine.video_frames import sample_video
from engine.vision import load_vision_encoder
from engine.vision_cache import MIB

DEFAULT_VISION_CACHE = 256 * MIB  # ≈ 18 images of 13 tiles at the 1B shape (13 × 256 × 1024 × 4 bytes each)


class GenerationError(RuntimeError):
    """The engine failed this request (the message says why); other requests are unaffected."""


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str  # the reply, cut at the stop token or a stop string, stripped
    token_ids: list[int]  # generated ids, stop token excluded
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    question: str  # as it enters the history (model.chat may prepend "<image>\n")
    content: str  # text without the reasoning: after </think>, or all of it when there is none
    reasoning_content: str | None  # inside <think>…</think> (engine/reasoning.py); None without it
    # with logprobs=True: per generated token, its log probability and the top_logprobs most likely
    # (id, log probability) pairs of that step (engine.llm.engine.TokenEvent); None otherwise
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] | None = None


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    prompt: Prompt
    features: RequestFeatures  # the images' prompt table (from the vision-feature cache or the encoder)
    image_keys: list[str]  # content keys (engine/image_key.py), one per image


class Pipeline:
    def __init__(
        self, config: ModelConfig, vision_encoder, llm: LLMEngine, tokenizer: TextTokenizer, vision_cache_bytes: int = DEFAULT_VISION_CACHE
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(config, tokenizer)
        self.vision = vision_encoder
        self.images = ImageFeatureSource.of(vision_encoder, config, vision_cache_bytes)
        self.image_keys = ImageKeys.of(config)
        self.video_limits = VideoLimits()  # bytes, length, frames and frame size of a video request
        self.llm = llm
        self.runner = EngineRunner(llm)
        # the engine thread references the runner, never the Pipeline: a Pipeline dropped without
        # close() is still collected, and collecting it stops the thread, which frees the model
        self._close_runner = weakref.finalize(self, self.runner.close)
        self._request_ids = itertools.count()

    def close(self) -> None:
        """Stops the engine loop's thread (also done when the Pipeline is garbage-collected)."""
        self._close_runner()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        vision_backend: str = "onnxruntime",
        vision_onnx: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        vision_cache_mib: int = DEFAULT_VISION_CACHE // MIB,
        prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_BYTES // MIB,
        llm_weights: str = "float32",
        vision_precision: str = "float32",
    ) -> Pipeline:
        """vision_cache_mib: bound of the vision-feature cache (engine/vision_cache.py); prefix_cache_mib:
        of the LLM's prefix KV reuse (engine/llm/prefix_cache.py); 0 turns either off. llm_weights:
        "float32" or "float16", the LLM's stored weights, activations fp32 (engine/llm/precision.py).
        vision_precision: "float32" or "int8", the ONNX Runtime vision graph (engine/vision_precision.py)."""
        config = ModelConfig.from_pretrained(path)
        tokenizer = TextTokenizer(path, config.skip_special_tokens)
        vision = load_vision_encoder(config, vision_backend, vision_onnx, vision_precision)
        guides = GuideCompiler(lambda: tokenizer_info(tokenizer.fast, [config.stop_token_id]), config.text.vocab_size)
        model = DecoderLM.from_pretrained(path, config.text, dtype, llm_weights)
        llm = LLMEngine(model, config.stop_token_id, prefix_cache_bytes=prefix_cache_mib * MIB, guides=guides)
        return cls(config, vision, llm, tokenizer, vision_cache_mib * MIB)

    def prepare(
        self,
        question: str,
        images: Sequence = (),
        history: Sequence[Turn] | None = None,
        max_tiles: int | None = None,
        system_message: str | None = None,
        max_total_tiles: int | None = None,
        video=None,
        num_segments: int = DEFAULT_NUM_FRAMES,
        bound: tuple[float, float] | None = None,
        max_tiles_per_frame: int = 1,
    ) -> PreparedRequest:
        """video (a path or encoded bytes): num_segments frames as the cards' load_video picks them
        (bound: (start, end) seconds), each an image of max_tiles_per_frame tiles (+ thumbnail)."""
        images = list(images)
        if video is None:
            max_tiles = self.config.tile_budget(max_tiles, max_total_tiles, len(images))
        else:
            if images or max_tiles is not None or max_total_tiles is not None:
                raise ValueError("a request has images or a video, not both (a video's frames take max_tiles_per_frame)")
            images = sample_video(video, num_segments, bound, self.video_limits).frames
            question = video_question(question, len(images), history is None)
            max_tiles = self.config.tile_budget(max_tiles_per_frame)
        keys = self.image_keys.keys(images, max_tiles)
        request = RequestImages(images, keys, max_tiles)
        features = self.images.features([request])[0]
        if isinstance(features, Exception):
            raise features
        prompt = self.prompts.build(question, features.num_tiles, history, system_message)
        return PreparedRequest(prompt, features, keys)

    def generate(self, question: str, images: Sequence = (), history: Sequence[Turn] | None = None, **kwargs) -> GenerationResult:
        run = self._run(question, images, history, **kwargs)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def stream(self, question: str, images: Sequence = (), history: Sequence[Turn] | None = None, **kwargs) -> Iterator[str]:
        yield from self._run(question, images, history, **kwargs)

    def chat(
        self,
        question: str,
        images: Sequence = (),
        history: Sequence[Turn] | None = None,
        return_history: bool = False,
        **kwargs,
    ) -> str | tuple[str, list[Turn]]:
        result = self.generate(question, images, history, **kwargs)
        if return_history:
            return result.text, [*(history or ()), (result.question, result.text)]
        return result.text

    def _run(
        self,
        question: str,
        images: Sequence,
        history: Sequence[Turn] | None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        max_tiles: int | None = None,
        max_total_tiles: int | None = None,
        system_message: str | None = None,
        stop: Sequence[str] = (),
        enable_thinking: bool = False,
        video=None,
        num_segments: int = DEFAULT_NUM_FRAMES,
        bound: tuple[float, float] | None = None,
        max_tiles_per_frame: int = 1,
        guide_type: str | None = None,
        guide: str | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> Generator[str, None, GenerationResult]:
        if enable_thinking and system_message is None:  # the InternVL3.5 card's switch (seed card 004)
            system_message = R1_SYSTEM_PROMPT
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            min_new_tokens=min_new_tokens,
            guide_type=guide_type,
            guide=guide,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        request = self.prepare(
            question, images, history, max_tiles, system_message, max_total_tiles, video, num_segments, bound, max_tiles_per_frame
        )
        input_ids, table, features, table_keys = request.prompt.input_ids, None, request.features, None
        if features.num_tiles:
            table = features.table
            table_keys = image_rows(request.image_keys, features.num_tiles, self.config.vision.tokens_per_tile)
            input_ids = drop_compressed(input_ids, self.config.text.vocab_size, self.config.vision.tokens_per_tile, features.tile_tokens)
        request_id = str(next(self._request_ids))
        reply = ReplyParts(self.tokenizer, tuple(stop), request.prompt.opens_reasoning)
        token_ids: list[int] = []
        scores: list[tuple[float, tuple[tuple[int, float], ...]]] = []
        finish_reason = None
        events: queue.SimpleQueue = queue.SimpleQueue()
        self.runner.submit(request_id, input_ids, table, params, events.put, table_keys=table_keys)
        try:
            while finish_reason is None:
                event = events.get()
                if event.finish_reason == "error":
                    finish_reason = "error"
                    raise GenerationError(event.error)
                if event.token_id is not None:
                    token_ids.append(event.token_id)
                    if logprobs:
                        scores.append((event.logprob, event.top_logprobs))
                    delta = reply.add([event.token_id], final=False)[0]
                    if delta:
                        yield delta
                finish_reason = "stop" if reply.stopped else event.finish_reason
        finally:
            if finish_reason is None or reply.stopped:  # closed early, or cut at a stop string
                self.runner.cancel(request_id)
        tail = reply.add([], final=True)[0]
        if tail:
            yield tail
        return GenerationResult(
            text=reply.text,
            token_ids=token_ids,
            finish_reason=finish_reason,
            prompt_tokens=len(input_ids),
            question=request.prompt.question,
            content=reply.content,
            reasoning_content=reply.reasoning_content,
            logprobs=scores if logprobs else None,
        )
