"""The GPU llm step's request mapping: one request of our llm contract (the CPU llm model's inputs)
→ the inputs of TensorRT-LLM's `tensorrt_llm` Triton model, and its responses → new token ids.

Pure numpy, so it is tested on CPU against the generated tensorrt_llm config; the Triton adapter
(triton_repo/gpu/llm/1/model.py) only moves tensors. Input names, types and semantics follow
TensorRT-LLM's triton_backend (all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt;
inflight_batcher_llm/src/utils.cc: prompt_table_extra_ids is used only when its length equals
the prompt's; topP ≤ 0 means unset).
"""

from __future__ import annotations

import hashlib

import numpy as np

from engine.sampling_params import SamplingParams, check_context

# our name -> dtype tensorrt_llm declares; sent when the client sent it
_SAMPLING = {"runtime_top_k": np.int32, "repetition_penalty": np.float32, "seed": np.uint64, "min_tokens": np.int32}


def tensorrt_llm_inputs(
    item: dict[str, np.ndarray], vocab_size: int, table_rows: int, image_key: int, max_seq_len: int
) -> dict[str, np.ndarray]:
    """item: this request's inputs without the batch dimension (input_ids [L], input_lengths [1],
    request_output_len [1], optional end_id, stop_words_list [2, N], streaming, temperature,
    runtime_top_p, runtime_top_k, repetition_penalty, seed, min_tokens).
    table_rows: rows of the request's prompt table (T·Q; 0 without images).
    image_key ≥ 1: this request's images in the KV-cache block hashes.
    -> tensorrt_llm inputs, each with the batch dimension [1, ...]. The prompt table itself is not
    here: the adapter passes it on as [1, T·Q, H] without copying it through numpy."""
    ids = np.asarray(item["input_ids"], np.int32).reshape(-1)
    if int(np.asarray(item["input_lengths"]).reshape(-1)[0]) != len(ids):
        raise ValueError(f"input_lengths {item['input_lengths'].tolist()} does not match the {len(ids)} input_ids")
    image_slots = ids >= vocab_size
    if int(image_slots.sum()) != table_rows:
        raise ValueError(f"the prompt has {int(image_slots.sum())} image-token slots but the prompt table has {table_rows} rows")
    if table_rows and int(ids.max()) - vocab_size >= table_rows:
        raise ValueError(f"input id {int(ids.max())} points past the prompt table ({table_rows} rows from id {vocab_size})")
    if image_key < 1:
        raise ValueError("image_key must be ≥ 1 (0 marks text tokens)")
    # the CPU llm's rules, so both targets refuse the same values with the same message
    requested = check_context(len(ids), _value(item, "request_output_len"), max_seq_len)
    params = SamplingParams.from_request(
        requested,
        temperature=_value(item, "temperature"),
        top_p=_value(item, "runtime_top_p"),
        top_k=_value(item, "runtime_top_k"),
        repetition_penalty=_value(item, "repetition_penalty"),
        seed=_value(item, "seed"),
        min_tokens=_value(item, "min_tokens"),
    )
    end_id = _value(item, "end_id")
    if end_id is not None and not 0 <= end_id < vocab_size:
        raise ValueError(f"stop token id {end_id} is not in the vocabulary [0, {vocab_size})")

    def scalar(value, dtype) -> np.ndarray:
        return np.asarray(value, dtype).reshape(1, 1)

    out = {
        "input_ids": ids[None],
        "input_lengths": scalar(len(ids), np.int32),
        "request_output_len": scalar(params.max_new_tokens, np.int32),
        "streaming": scalar(bool(_value(item, "streaming", False)), np.bool_),
        "exclude_input_in_output": scalar(True, np.bool_),
    }
    if end_id is not None:
        out["end_id"] = out["pad_id"] = scalar(end_id, np.int32)
    stop_words = item.get("stop_words_list")
    if stop_words is not None and stop_words.shape[-1] > 0:
        out["stop_words_list"] = np.asarray(stop_words, np.int32)[None]
    if params.do_sample:  # without top-k/top-p TensorRT-LLM would be greedy, so top_p 1 = the whole vocabulary
        out["temperature"] = scalar(params.effective_temperature, np.float32)
        out["runtime_top_p"] = scalar(params.top_p, np.float32)
    else:  # absent or 0: greedy, as on the CPU path
        out["runtime_top_k"] = scalar(1, np.int32)
    for name, dtype in _SAMPLING.items():
        if name in item and not (name == "runtime_top_k" and not params.do_sample):
            out[name] = scalar(_value(item, name), dtype)
    if table_rows:
        # uint64 operands: a Python int ≥ 2**63 with an int 0 makes numpy go through float64 (rounded,
        # or 0 with "invalid value" for 2**64 - 1); tensorrt_llm reads the input as uint64 exactly
        out["prompt_table_extra_ids"] = np.where(image_slots, np.uint64(image_key), np.uint64(0))[None]
    return out


def image_key(request_key: bytes) -> int:
    """A per-request id ≥ 1 for the request's image-token slots (prompt_table_extra_ids). Image
    slots hold the same fake ids (vocab_size + row) in every request, so without it KV-cache reuse
    would hand one request the blocks another request computed from a different image."""
    return int.from_bytes(hashlib.blake2b(request_key, digest_size=8).digest(), "little") or 1


def response_tokens(output_ids: np.ndarray, sequence_length: np.ndarray) -> np.ndarray:
    """output_ids [1, beams, N], sequence_length [1, beams] → beam 0's new tokens [n] (int32)."""
    return np.asarray(output_ids)[0, 0, : int(np.asarray(sequence_length)[0, 0])].astype(np.int32)


def _value(item: dict[str, np.ndarray], name: str, default=None):
    if name not in item:
        return default
    return np.asarray(item[name]).reshape(-1)[0].item()


def finish_reason(generated: int, requested: int) -> str:
    """tensorrt_llm's Triton outputs (output_ids, sequence_length, ...) carry no finish reason: a reply
    that used its whole budget ended by length, any shorter one by its end id or a stop word."""
    return "length" if generated >= requested else "stop"
