"""Request fields as they arrive over Triton, and TensorRT-LLM's tensor formats.

Image elements are raw encoded bytes or base64 text (so JSON requests can carry images); history
is a JSON list of [user, assistant] turns; stop words travel as TensorRT-LLM's `stop_words_list`
[2, N] int32: row 0 the concatenated token ids, row 1 the cumulative end offsets (padded with -1).
"""

from __future__ import annotations

import base64
import binascii
import json
import re

import numpy as np

from engine.templates import Turn
from engine.tokenizer import TextTokenizer


# Triton dtype -> numpy dtype of the ensemble's non-BYTES inputs (BYTES travel as numpy object arrays)
TRITON_NUMPY = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}


class RequestError(ValueError):
    """A request field is malformed; the message names the field."""


# Errors caused by the request itself: every one is a ValueError subclass (engine/preprocess.py
# ImageError, engine/video.py VideoError, engine/prompt.py PromptError, engine/sampling_params.py
# SamplingParamError, engine/llm/guided.py GuideError, ...), and the Triton models report them as "<class>: <message>"
# (triton_repo/pb.py error_response). Triton core's own input checks ("[request id: …] expected …", "unexpected …") are the request's too.
REQUEST_ERRORS = ("ValueError", "RequestError", "PromptError", "SamplingParamError", "ImageError", "VideoError", "GuideError")
_TRITON_INPUT_ERRORS = re.compile(
    r"^(\[request id: [^\]]*\] )?(expected|unexpected|inference input)\b"
)


def input_array(dtype: str, values: list) -> np.ndarray:
    """One request's input as Triton takes it: the values with a leading batch dim of 1."""
    return np.array([values], dtype=object if dtype == "BYTES" else TRITON_NUMPY[dtype])


def stop_request(request_id: str) -> tuple[str, list[tuple[str, str, np.ndarray]], str]:
    """The request that ends a running ensemble request: (model, [(input, dtype, value)], request id).
    Triton does not cancel a running decoupled step of an ensemble; the llm model's `stop` input does
    (TensorRT-LLM's convention). The required llm inputs ride along unused."""
    inputs = [
        ("input_ids", "INT32", np.zeros((1, 1), np.int32)),
        ("input_lengths", "INT32", np.ones((1, 1), np.int32)),
        ("stop", "BOOL", np.ones((1, 1), np.bool_)),
    ]
    return "llm", inputs, request_id


def score_outputs(logprobs=(), cum: float | None = None, top_logprobs=None, top_ids=None) -> dict[str, np.ndarray]:
    """The llm step's log-probability outputs for one response's n tokens (CPU engine and GPU wrapper
    alike): output_log_probs [n], cum_log_probs [1] (the reply's sum so far; [0] when the request did
    not ask), top_log_probs / top_token_ids [n, k] (k = 0 without top_logprobs). No arguments: the
    outputs of a request without return_log_probs, all empty."""
    logprobs = np.asarray(logprobs, np.float32).reshape(-1)
    no_top = np.zeros((len(logprobs), 0))
    return {
        "output_log_probs": logprobs,
        "cum_log_probs": np.zeros(0, np.float32) if cum is None else np.array([cum], np.float32),
        "top_log_probs": np.asarray(no_top if top_logprobs is None else top_logprobs, np.float32),
        "top_token_ids": np.asarray(no_top if top_ids is None else top_ids, np.int32),
    }


def strip_error_prefix(message: str) -> str:
    """The model's own message, without the ensemble's "in ensemble 'internvl', " prefix."""
    return re.sub(r"^in ensemble '[^']*', ", "", message.strip())


def is_request_error(message: str) -> bool:
    """True when a Triton error message says the request was invalid (the API answers 400), False
    for the server's own failures (500)."""
    message = strip_error_prefix(message)
    name = message.partition(":")[0]
    return name in REQUEST_ERRORS or bool(_TRITON_INPUT_ERRORS.match(message))


def check_images(images: list[bytes], max_images: int, max_bytes: int) -> None:
    if len(images) > max_images:
        raise RequestError(f"image_bytes: the request has {len(images)} images; this deployment allows {max_images}")
    total = sum(len(i) for i in images)
    if total > max_bytes:
        raise RequestError(f"image_bytes: the request's images hold {total} bytes; this deployment allows {max_bytes}")


def image_from_element(element: bytes, index: int) -> bytes:
    """Raw encoded image bytes, or base64 text of them (optionally a `data:...;base64,` URL)."""
    if element[:5] == b"data:":
        element = element.partition(b",")[2]
    elif not element or not element.strip().isascii() or b"\x00" in element:
        return element  # binary: already raw (empty input is reported by the decoder)
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        return element  # text that is not base64 (e.g. an SVG/PPM): let the decoder judge it


# num_frames absent: the frames the cards sample (load_video(..., num_segments=8) in their examples)
DEFAULT_NUM_FRAMES = 8


def video_from_element(element: bytes) -> bytes:
    """Raw encoded video bytes, or base64 text of them (optionally a `data:...;base64,` URL)."""
    return image_from_element(element, 0)


def image_rows(image_keys: list[str], image_tiles, tokens_per_tile: int) -> list[tuple[str, int]]:
    """(content key, prompt-table rows) per image: image i owns tiles_i × tokens_per_tile consecutive
    rows of the request's prompt table (its static layout, also on InternVL3.5-Flash)."""
    tiles = [int(n) for n in image_tiles]
    if len(image_keys) != len(tiles):
        raise ValueError(f"image_keys has {len(image_keys)} keys but image_tiles {len(tiles)} tile counts")
    return [(key, n * tokens_per_tile) for key, n in zip(image_keys, tiles)]


def parse_history(raw: bytes | str | None) -> list[Turn] | None:
    if raw is None:
        return None
    try:
        turns = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"history must be a JSON list of [user, assistant] pairs: {e}") from e
    if not isinstance(turns, list) or not all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(m, str) for m in t) for t in turns
    ):
        raise RequestError("history must be a JSON list of [user, assistant] string pairs")
    return [(user, assistant) for user, assistant in turns]


def stop_words_list(tokenizer: TextTokenizer, words: list[str]) -> np.ndarray:
    # -> int32 [2, N] (TensorRT-LLM `stop_words_list` for one request, no batch dim)
    ids = [tokenizer.encode(w) for w in words if w]
    flat = [t for seq in ids for t in seq]
    offsets = np.cumsum([len(seq) for seq in ids]).tolist()
    out = np.full((2, max(len(flat), 1) if ids else 0), -1, dtype=np.int32)
    out[0, : len(flat)] = flat
    out[0, len(flat) :] = 0
    out[1, : len(offsets)] = offsets
    return out


def stop_sequences(words_list: np.ndarray | None) -> tuple[tuple[int, ...], ...]:
    # words_list: int32 [2, N] -> the token sequences it holds
    if words_list is None or words_list.size == 0:
        return ()
    flat, offsets = words_list[0].tolist(), [o for o in words_list[1].tolist() if o >= 0]
    starts = [0, *offsets[:-1]]
    return tuple(tuple(flat[a:b]) for a, b in zip(starts, offsets) if b > a)
