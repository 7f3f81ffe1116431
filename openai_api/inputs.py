"""A chat completion request -> the ensemble's input fields. Value ranges are checked with the rules
Triton applies (engine/sampling_params.py), plus top_p > 0 (in the OpenAI API top_p 0 is not "off")
and every float field finite in float32, the type Triton receives it as."""

from __future__ import annotations

import json
import math

import numpy as np

from engine.sampling_params import SamplingParamError, SamplingParams
from openai_api.conversation import NUM_FRAMES, Conversation
from openai_api.errors import bad_request
from openai_api.schema import ChatCompletionRequest
from openai_api.structured import requested_guide
from openai_api.triton import Fields

# SamplingParams' names for fields this API names otherwise
API_NAMES = {"guided_decoding_guide_type": "structured_outputs", "guided_decoding_guide": "structured_outputs", "return_log_probs": "logprobs"}


# Every float field travels to Triton as FP32: a finite JSON number beyond float32's range arrives as inf.
FP32_FIELDS = tuple(name for name, field in ChatCompletionRequest.model_fields.items() if field.annotation in (float, float | None))
FP32_MAX = float(np.finfo(np.float32).max)


def max_tokens(body: ChatCompletionRequest) -> int | None:
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


def check_values(body: ChatCompletionRequest) -> None:
    """Raises a 400 APIError naming the field whose value is out of range."""
    if body.n is not None and body.n != 1:
        raise bad_request(f"n must be 1 (one choice per request), got {body.n}", "n")
    for field in FP32_FIELDS:
        if (value := getattr(body, field)) is not None and not (math.isfinite(value) and abs(value) <= FP32_MAX):
            raise bad_request(f"{field} must be a finite number within float32's range (|x| ≤ {FP32_MAX:.6g}), got {value}", field)
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {body.top_p}", "top_p")
    for field in ("max_tokens", "max_completion_tokens", "top_k", "min_tokens", "top_logprobs"):  # INT32 inputs
        if (value := getattr(body, field)) is not None and value >= 2**31:
            raise bad_request(f"{field} must be < 2^31, got {value}", field)
    limit = max_tokens(body)
    guide_type, guide = requested_guide(body) or (None, None)
    try:
        # max_tokens absent means "up to the context length", which the ensemble decides: any valid stand-in.
        SamplingParams.from_request(
            1 if limit is None else limit, body.temperature, body.top_p, body.top_k, body.repetition_penalty, body.seed,
            body.min_tokens, guide_type=guide_type, guide=guide, logprobs=body.logprobs, top_logprobs=body.top_logprobs,
        )  # fmt: skip
    except SamplingParamError as e:
        param = "max_completion_tokens" if e.field == "max_tokens" and body.max_completion_tokens is not None else e.field
        raise bad_request(str(e), API_NAMES.get(param, param)) from None


def ensemble_fields(body: ChatCompletionRequest, conversation: Conversation, images: list[bytes], stream: bool, video: bytes | None = None) -> Fields:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    thinking = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else None
    guide_type, guide = requested_guide(body) or (None, None)
    optional = {
        "image_bytes": ("BYTES", images or None),
        "video_bytes": ("BYTES", video),
        "num_frames": ("INT32", None if video is None else NUM_FRAMES),
        "max_tokens": ("INT32", max_tokens(body)),
        "temperature": ("FP32", body.temperature),
        "top_p": ("FP32", body.top_p),
        "top_k": ("INT32", body.top_k),
        "repetition_penalty": ("FP32", body.repetition_penalty),
        "random_seed": ("UINT64", body.seed),
        "min_tokens": ("INT32", body.min_tokens),
        "stop_words": ("BYTES", [s for s in stop if s] or None),
        "max_tiles": ("INT32", conversation.max_tiles),
        "history": ("BYTES", json.dumps([list(t) for t in conversation.history]) if conversation.history else None),
        "system_prompt": ("BYTES", conversation.system_prompt),
        "enable_thinking": ("BOOL", thinking),
        "guided_decoding_guide_type": ("BYTES", guide_type),
        "guided_decoding_guide": ("BYTES", guide),
        "return_log_probs": ("BOOL", body.logprobs or None),
        "top_logprobs": ("INT32", body.top_logprobs if body.logprobs else None),
    }
    fields: Fields = {"text_input": ("BYTES", [conversation.question]), "stream": ("BOOL", [stream])}
    for name, (dtype, value) in optional.items():
        if value is not None:
            fields[name] = (dtype, value if isinstance(value, list) else [value])
    return fields
