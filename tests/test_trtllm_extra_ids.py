"""prompt_table_extra_ids for TensorRT-LLM's KV-cache reuse (engine/trtllm_request.py), checked
against what TensorRT-LLM 1.2's sources require: one uint64 per prompt token (triton_backend
inflight_batcher_llm/src/utils.cc drops them at another length; batch_manager/llmRequest.cpp refuses a
prompt-table request without them when reuse is on), 0 on text tokens (the id generated tokens get,
llmRequest.h addNewToken), a block matching only when every (token id, extra id) pair does
(kvCacheManager.cpp BlockKey): the same image the same ids in any request, different images never."""

from __future__ import annotations

import numpy as np
import pytest

from engine.trtllm_request import image_extra_id, request_extra_id, table_extra_ids, tensorrt_llm_inputs

VOCAB, Q = 1000, 4  # tokens_per_tile 4 keeps the prompts readable


def extra_ids(ids: list[int], keys: list[str] | None, tiles: list[int] | None, request_key: bytes = b"r") -> np.ndarray:
    rows = int(np.sum(np.asarray(ids) >= VOCAB))
    item = {"input_ids": np.array(ids, np.int32), "input_lengths": np.array([len(ids)], np.int32), "request_output_len": np.array([4], np.int32)}
    row_ids = table_extra_ids(rows, Q, keys, None if tiles is None else np.array(tiles), request_key)
    return tensorrt_llm_inputs(item, VOCAB, row_ids, max_seq_len=1000)["prompt_table_extra_ids"]


def image(first_row: int, tiles: int = 1) -> list[int]:
    return [VOCAB + r for r in range(first_row, first_row + tiles * Q)]


def test_one_uint64_id_per_prompt_token_and_zero_on_text():
    ids = [1, 2, *image(0), 3, *image(Q, 2), 4]
    extra = extra_ids(ids, ["a", "b"], [1, 2])
    assert extra.dtype == np.uint64 and extra.shape == (1, len(ids))
    slots = np.array(ids) >= VOCAB
    assert not extra[0, ~slots].any() and extra[0, slots].all()
    assert [int(x) for x in extra[0, slots]] == [image_extra_id("a")] * Q + [image_extra_id("b")] * 2 * Q


def test_the_same_image_gets_the_same_ids_in_any_request_and_other_images_never():
    a_then_b = extra_ids([1, *image(0), 2, *image(Q)], ["a", "b"], [1, 1], b"request-1")
    a_then_c = extra_ids([1, *image(0), 2, *image(Q)], ["a", "c"], [1, 1], b"request-2")
    assert (a_then_b[0, : Q + 2] == a_then_c[0, : Q + 2]).all()  # the shared prefix: same pairs, reusable blocks
    assert not set(a_then_b[0, Q + 2 :].tolist()) & set(a_then_c[0, Q + 2 :].tolist())
    assert len({image_extra_id(k) for k in ("a", "b", "c")}) == 3 and all(image_extra_id(k) >> 63 for k in "abc")


def test_without_image_keys_each_request_gets_its_own_id():
    ids = [1, *image(0), 2]
    one, two = extra_ids(ids, None, None, b"request-1"), extra_ids(ids, None, None, b"request-2")
    assert set(one[0, 1 : Q + 1].tolist()) == {request_extra_id(b"request-1")} != set(two[0, 1 : Q + 1].tolist())


@pytest.mark.parametrize(
    "keys, tiles, message",
    [
        (["a", "b"], [1], "image_keys has 2 keys but image_tiles 1 tile counts"),
        (["a"], [2], r"image_tiles \[2\] × 4 tokens do not cover the prompt table's 4 rows"),
        (["a"], [0], r"image_tiles \[0\] × 4 tokens do not cover"),
    ],
)
def test_keys_that_do_not_cover_the_table_are_refused(keys, tiles, message):
    with pytest.raises(ValueError, match=message):
        table_extra_ids(Q, Q, keys, np.array(tiles), b"r")
