"""The GPU llm step's request mapping: one request of our llm contract (the CPU llm model's inputs)
→ the inputs of TensorRT-LLM's `tensorrt_llm` Triton model, and its responses → new token ids.

Pure numpy, so it is tested on CPU against the generated tensorrt_llm config; the Triton adapter
(triton_repo/gpu/llm/1/model.py) only moves tensors. Input names, types and semantics follow
TensorRT-LLM's triton_backend (all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt;
inflight_batcher_llm/src/utils.cc: prompt_table_extra_ids is used only when its length equals
the prompt's; topP ≤ 0 means unset).

KV-cache reuse keys (TensorRT-LLM cpp/include/tensorrt_llm/runtime/common.h, UniqueToken;
batch_manager/kvCacheManager.cpp, BlockKey / BlockKeyHasher): a prompt position is (token id, extra
id), extra ids are std::uint64_t, and a block is reused only when its parent chain and every
position's pair are equal. Our image slots hold fake ids vocab_size + row in every request, so the
extra id is what tells images apart: each image's rows carry an id from its content key
(engine/image_key.py), equal for the same image in any request. Rows appear in the prompt in table
order, so an equal chain of (fake id, image id) pairs before a position also means equal earlier
images, hence the same table row there. Text tokens get 0, the id TensorRT-LLM gives generated
tokens (llmRequest.h addNewToken), so a next turn's copy of a reply matches the blocks stored from
its generation. With reuse on and a prompt table, the ids must be sent, one per prompt token
(batch_manager/llmRequest.cpp validate; utils.cc drops them at another length); a request without
ids uses usesExtraIds = false in its block keys, so text-only requests share no blocks with image ones.
Read at NVIDIA/TensorRT-LLM commits of the search index (kvCacheManager.cpp at 002ba6a), not at the
v1.2.1 tag, which could not be fetched (over the fetch limit).

Structured output and log probabilities (triton_backend/inflight_batcher_llm/src/utils.cc at c8c6df0):
getGuidedDecodingParamsFromTensors reads guided_decoding_guide_type / guided_decoding_guide as the raw
Triton BYTES buffer minus its first 4 bytes (the element's length prefix), so each holds exactly one
string; a type outside json | json_schema | regex | ebnf_grammar is silently ignored, guide and all
(SamplingParams refuses it first). getOutputConfigFromTensors reads return_log_probs (absent = false).
The answers (src/model_instance_state.cc fillTritonResponse, at c8c6df0): output_log_probs
[1, beams, N] (beams padded with -1) and cum_log_probs [1, beams], only when requested and the request
set return_log_probs. Unlike output_ids, which in streaming hold only the new tokens,
batch_manager/llmRequest.cpp createResult (at 119c6e6) copies the whole per-beam list so far
(result.logProbs = getLogProbs(), mLogProbs grows by setLogProbs) into every response:
response_log_probs slices off what was already sent.
"""

from __future__ import annotations

import hashlib

import numpy as np

from engine.protocol import image_rows, score_outputs
from engine.sampling_params import SamplingParamError, SamplingParams, check_context

NO_TOP_LOGPROBS = "TensorRT-LLM's tensorrt_llm model returns only the chosen tokens' log probabilities (return_log_probs)"
# our name -> dtype tensorrt_llm declares; sent when the client sent it
_SAMPLING = {"runtime_top_k": np.int32, "repetition_penalty": np.float32, "seed": np.uint64, "min_tokens": np.int32}


def tensorrt_llm_inputs(
    item: dict[str, np.ndarray], vocab_size: int, row_ids: np.ndarray, max_seq_len: int
) -> dict[str, np.ndarray]:
    """item: this request's inputs without the batch dimension (input_ids [L], input_lengths [1],
    request_output_len [1], optional end_id, stop_words_list [2, N], streaming, temperature,
    runtime_top_p, runtime_top_k, repetition_penalty, seed, min_tokens, guided_decoding_guide_type and
    guided_decoding_guide (BYTES [1]), return_log_probs, top_logprobs).
    row_ids: uint64 [T·Q], the extra id of each prompt-table row (table_extra_ids; empty without images).
    -> tensorrt_llm inputs, each with the batch dimension [1, ...]. The prompt table itself is not
    here: the adapter passes it on as [1, T·Q, H] without copying it through numpy."""
    ids = np.asarray(item["input_ids"], np.int32).reshape(-1)
    table_rows = len(row_ids)
    if int(np.asarray(item["input_lengths"]).reshape(-1)[0]) != len(ids):
        raise ValueError(f"input_lengths {item['input_lengths'].tolist()} does not match the {len(ids)} input_ids")
    image_slots = ids >= vocab_size
    if int(image_slots.sum()) != table_rows:
        raise ValueError(f"the prompt has {int(image_slots.sum())} image-token slots but the prompt table has {table_rows} rows")
    if table_rows and int(ids.max()) - vocab_size >= table_rows:
        raise ValueError(f"input id {int(ids.max())} points past the prompt table ({table_rows} rows from id {vocab_size})")
    if np.asarray(row_ids).dtype != np.uint64 or not np.all(row_ids):
        raise ValueError("row_ids must be nonzero uint64 ids (0 marks text tokens)")
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
        guide_type=_text(item, "guided_decoding_guide_type"),
        guide=_text(item, "guided_decoding_guide"),
        logprobs=_value(item, "return_log_probs"),
        top_logprobs=_value(item, "top_logprobs"),
    )
    if params.top_logprobs:
        raise SamplingParamError("top_logprobs", f"is not available on the GPU path: {NO_TOP_LOGPROBS}", params.top_logprobs)
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
    out.update(_guide_and_log_probs(params))
    if table_rows:
        # filled in uint64 (np.where with a Python int ≥ 2**63 went through float64); tensorrt_llm
        # reads the input as uint64 exactly
        extra = np.zeros(len(ids), np.uint64)
        extra[image_slots] = row_ids[ids[image_slots] - vocab_size]
        out["prompt_table_extra_ids"] = extra[None]
    return out


def _guide_and_log_probs(params: SamplingParams) -> dict[str, np.ndarray]:
    """-> the guide tensors (BYTES as object [1, 1], one string each: utils.cc reads the raw buffer)
    when the request has a guide, and return_log_probs [1, 1] when it asks; absent otherwise."""
    out = {}
    if params.guide_type is not None:
        out["guided_decoding_guide_type"] = np.array([[params.guide_type.encode()]], dtype=object)
    if params.guide is not None:
        out["guided_decoding_guide"] = np.array([[params.guide.encode()]], dtype=object)
    if params.logprobs:
        out["return_log_probs"] = np.ones((1, 1), np.bool_)
    return out


def table_extra_ids(
    rows: int, tokens_per_tile: int, image_keys: list[str] | None, image_tiles: np.ndarray | None, request_key: bytes
) -> np.ndarray:
    """-> uint64 [rows]: each prompt-table row's extra id, its image's image_extra_id (image i owns
    tiles_i × tokens_per_tile rows, in order). Without image_keys / image_tiles every row gets the
    request's own id: correct, but nothing is reused across requests."""
    if image_keys is None or image_tiles is None:
        return np.full(rows, request_extra_id(request_key), np.uint64)
    tiles = np.asarray(image_tiles, np.int64).reshape(-1)
    segments = image_rows(image_keys, tiles, tokens_per_tile)
    if (tiles < 1).any() or sum(n for _, n in segments) != rows:
        raise ValueError(f"image_tiles {tiles.tolist()} × {tokens_per_tile} tokens do not cover the prompt table's {rows} rows")
    ids = np.array([image_extra_id(key) for key, _ in segments], np.uint64)
    return np.repeat(ids, [n for _, n in segments])


def image_extra_id(key: str) -> int:
    """An image's id from its content key: the first 8 bytes of its sha256, top bit set so it is never
    0 (the text and generated tokens' id); any uint64 is valid to TensorRT-LLM (TokenExtraIdType)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") | 1 << 63


def request_extra_id(request_key: bytes) -> int:
    """A per-request id, never 0, for image rows without content keys."""
    return int.from_bytes(hashlib.blake2b(request_key, digest_size=8).digest(), "little") | 1 << 63


def response_tokens(output_ids: np.ndarray, sequence_length: np.ndarray) -> np.ndarray:
    """output_ids [1, beams, N], sequence_length [1, beams] → beam 0's new tokens [n] (int32)."""
    return np.asarray(output_ids)[0, 0, : int(np.asarray(sequence_length)[0, 0])].astype(np.int32)


def response_log_probs(tensors: dict[str, np.ndarray], new_tokens: int, sent: int) -> tuple[np.ndarray, float]:
    """tensors: one tensorrt_llm response's output_log_probs [1, beams, N] and cum_log_probs [1, beams];
    new_tokens: its beam-0 token count; sent: log probs of this reply already taken.
    -> (beam 0's log probs of this response's tokens [new_tokens] float32, the reply's sum so far).
    The list is the whole reply so far (llmRequest.cpp createResult), so [sent:]; a list of exactly
    the new tokens is taken as it is, should a TensorRT-LLM send only those (its PyTorch backend does
    since NVIDIA/TensorRT-LLM#8785)."""
    if "output_log_probs" not in tensors or "cum_log_probs" not in tensors:
        raise ValueError("tensorrt_llm sent no output_log_probs / cum_log_probs for a request with return_log_probs")
    listed = np.asarray(tensors["output_log_probs"], np.float32)[0, 0]
    if len(listed) >= sent + new_tokens:
        own = listed[sent : sent + new_tokens]
    elif len(listed) == new_tokens:
        own = listed
    else:
        raise ValueError(f"tensorrt_llm sent {len(listed)} log probs for {new_tokens} new tokens after {sent}")
    return own, float(np.asarray(tensors["cum_log_probs"]).reshape(-1)[0])


class ReplyScores:
    """One reply's log probabilities as tensorrt_llm's responses bring them; take() -> the llm's score
    outputs for the tokens added since the last take, as the CPU llm sends them (pb.llm_response)."""

    def __init__(self):
        self.sent, self.cum = 0, 0.0
        self.pending: list[np.ndarray] = []

    def add(self, tensors: dict[str, np.ndarray], new_tokens: int) -> None:
        own, self.cum = response_log_probs(tensors, new_tokens, self.sent)
        self.sent += len(own)
        self.pending.append(own)

    def take(self) -> dict[str, np.ndarray]:
        # no top-k outputs: tensorrt_llm has no top-k log probs (top_logprobs > 0 is refused)
        own = np.concatenate([np.zeros(0, np.float32), *self.pending])
        self.pending = []
        return score_outputs(own, self.cum)


def _value(item: dict[str, np.ndarray], name: str, default=None):
    if name not in item:
        return default
    return np.asarray(item[name]).reshape(-1)[0].item()


def _text(item: dict[str, np.ndarray], name: str) -> str | None:
    """A BYTES input's one element as text (numpy object arrays of bytes); None when absent."""
    if name not in item:
        return None
    value = np.asarray(item[name], dtype=object).reshape(-1)[0]
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:  # the CPU llm's message (triton_repo/pb.py utf8)
        raise ValueError(f"input {name!r} is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def finish_reason(generated: int, requested: int) -> str:
    """tensorrt_llm's Triton outputs (output_ids, sequence_length, ...) carry no finish reason: a reply
    that used its whole budget ended by length, any shorter one by its end id or a stop word."""
    return "length" if generated >= requested else "stop"
