"""Prefix reuse in the CPU engine (engine/llm/prefix_cache.py): a prompt that starts with the tokens
and images of an earlier one takes that prefix's K/V from the cache, and its reply is token-identical
to a cold run (an engine with the cache off) — with other requests in the batch, chunked prefill,
aborts, errors, eviction, and on the sliding-window/sinks (GPT-OSS) and MoE decoders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.llm.engine import LLMEngine, TokenEvent
from engine.llm.prefix_cache import BLOCK_SIZE, block_hashes
from engine.sampling_params import SamplingParams
from tests.test_llm_engine import Setup, qwen3, random_table, setups, text_ids, tokens_of  # noqa: F401

Q = 256  # rows per image: one tile of the tiny checkpoints (real InternVL geometry)
GREEDY = SamplingParams(max_new_tokens=16)


@dataclasses.dataclass
class Turn:
    ids: np.ndarray  # int32 [L]
    table: np.ndarray | None  # float32 [rows, H]
    keys: list[tuple[str, int]] | None


def first_turn(setup: Setup, rng: np.random.Generator, image: np.ndarray, key: str = "image-a") -> Turn:
    """system text, <img>, the image's rows, </img>, a question, the assistant header."""
    fake = setup.vocab + np.arange(len(image))
    ids = np.concatenate([text_ids(rng, 21), [7], fake, [8], text_ids(rng, 12), [9, 10]]).astype(np.int32)
    return Turn(ids, image, [(key, len(image))])


def next_turn(turn: Turn, reply: list[int], rng: np.random.Generator) -> Turn:
    """The first turn's prompt, its reply, then a new question: the history of a chat."""
    tail = np.concatenate([reply, [11], text_ids(rng, 9), [9, 10]]).astype(np.int32)
    return Turn(np.concatenate([turn.ids, tail]), turn.table, turn.keys)


def run(engine: LLMEngine, requests: dict[str, tuple[Turn, SamplingParams]], aborts: dict[str, int] | None = None):
    """Adds every request at once, steps until idle (aborting request r at step aborts[r]);
    -> tokens per request, the step batch sizes."""
    for rid, (turn, params) in requests.items():
        engine.add_request(rid, turn.ids, turn.table, params, turn.keys)
    events: dict[str, list[TokenEvent]] = {rid: [] for rid in requests}
    sizes = []
    while engine.has_work():
        for rid, at in (aborts or {}).items():
            if at == len(sizes):
                engine.abort(rid)
        for event in engine.step():
            events[event.request_id].append(event)
        sizes.append(engine.last_batch_size)
        assert len(sizes) < 10_000
    for rid, got in events.items():
        assert got[-1].finish_reason is not None, rid
    return {rid: tokens_of(got) for rid, got in events.items()}, sizes


def cold(setup: Setup, turn: Turn, params: SamplingParams = GREEDY, **kwargs) -> list[int]:
    engine = LLMEngine(setup.model, setup.cfg.stop_token_id, prefix_cache_bytes=0, **kwargs)
    return run(engine, {"cold": (turn, params)})[0]["cold"]


def warm_engine(setup: Setup, **kwargs) -> LLMEngine:
    return LLMEngine(setup.model, setup.cfg.stop_token_id, **kwargs)


def full_blocks(n: int) -> int:
    return n // BLOCK_SIZE * BLOCK_SIZE


@pytest.fixture(scope="module")
def chat(qwen3):
    """Two images and a first turn on image A with its cold reply."""
    rng = np.random.default_rng(5)
    a, b = random_table(qwen3, rng, Q), random_table(qwen3, rng, Q)
    turn = first_turn(qwen3, rng, a)
    return a, b, turn, cold(qwen3, turn)


# ------------------------------------------------------------------ keys


def test_block_hashes_follow_image_content_not_fake_id_numbering(qwen3):
    rng = np.random.default_rng(1)
    v, text = qwen3.vocab, text_ids(rng, 20)
    ids = torch.as_tensor(np.concatenate([text, v + np.arange(Q), text]), dtype=torch.int64)
    alone = block_hashes(ids, v, [("a", Q)], Q)
    assert len(alone) == (2 * 20 + Q) // BLOCK_SIZE
    # the same image's rows behind another image's rows in the table: other fake ids, same hashes
    shifted = torch.as_tensor(np.concatenate([text, v + Q + np.arange(Q), text]), dtype=torch.int64)
    assert block_hashes(shifted, v, [("b", Q), ("a", Q)], 2 * Q) == alone
    # another image under the same fake ids: equal up to the first image token, different from there on
    other = block_hashes(ids, v, [("b", Q)], Q)
    assert other[:1] == alone[:1] and not set(other[1:]) & set(alone)
    # no keys: no block past the first fake id
    assert block_hashes(ids, v, None, Q) == alone[:1]
    with pytest.raises(ValueError, match="table_keys cover 200 prompt-table rows but the prompt table has 256"):
        block_hashes(ids, v, [("a", 200)], Q)


def test_table_keys_that_do_not_cover_the_table_are_refused(qwen3, chat):
    a, _, turn, _ = chat
    engine = warm_engine(qwen3)
    with pytest.raises(ValueError, match="table_keys cover 255 prompt-table rows"):
        engine.add_request("bad", turn.ids, turn.table, GREEDY, [("a", Q - 1)])
    assert not engine.has_work()


# ------------------------------------------------------------------ the acceptance cases


def test_second_turn_with_the_same_image_reuses_the_first_turns_prompt(qwen3, chat):
    a, b, turn, reply = chat
    second = next_turn(turn, reply, np.random.default_rng(6))
    expected = cold(qwen3, second)
    # input-sensitive: the image and the history change the reply, so a wrong hand-off shows
    assert expected != cold(qwen3, dataclasses.replace(second, table=b)) and expected != reply
    engine = warm_engine(qwen3)
    assert run(engine, {"first": (turn, GREEDY)})[0]["first"] == reply
    assert engine.prefix_hit_tokens == 0
    assert run(engine, {"second": (second, GREEDY)})[0]["second"] == expected
    assert engine.prefix_hit_tokens == full_blocks(len(turn.ids)) >= 0.9 * len(turn.ids)


def test_second_turn_reuses_its_prefix_with_four_other_requests_in_the_batch(qwen3, chat):
    a, b, turn, reply = chat
    rng = np.random.default_rng(7)
    second = next_turn(turn, reply, rng)
    others = {  # different prompts, one with another image, one sampled
        "text": (Turn(text_ids(rng, 30), None, None), SamplingParams(max_new_tokens=12)),
        "image-b": (first_turn(qwen3, rng, b, "image-b"), SamplingParams(max_new_tokens=6)),
        "long": (Turn(text_ids(rng, 300), None, None), SamplingParams(max_new_tokens=9)),
        "sampled": (Turn(text_ids(rng, 13), None, None), SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.3, seed=3)),
    }
    engine = warm_engine(qwen3, max_batch_size=5, max_num_tokens=128)
    run(engine, {"first": (turn, GREEDY)})
    tokens, sizes = run(engine, {"second": (second, GREEDY), **others})
    assert max(sizes) == 5
    assert engine.prefix_hit_tokens == full_blocks(len(turn.ids)) >= 0.9 * len(turn.ids)
    assert tokens["second"] == cold(qwen3, second)
    for rid, (other, params) in others.items():
        assert tokens[rid] == cold(qwen3, other, params), rid


def test_another_image_under_identical_token_ids_reuses_nothing_past_its_first_image_token(qwen3, chat):
    a, b, turn, reply = chat
    with_b = dataclasses.replace(turn, table=b, keys=[("image-b", Q)])
    expected = cold(qwen3, with_b)
    assert expected != reply
    first_image_token = int(np.argmax(turn.ids >= qwen3.vocab))
    engine = warm_engine(qwen3)
    run(engine, {"a": (turn, GREEDY)})
    assert run(engine, {"b": (with_b, GREEDY)})[0]["b"] == expected
    assert engine.prefix_hit_tokens == full_blocks(first_image_token)
    # without keys a fake id is never reused either
    no_keys = dataclasses.replace(turn, keys=None)
    assert run(engine, {"a-again": (no_keys, GREEDY)})[0]["a-again"] == reply
    assert engine.prefix_hit_tokens == 2 * full_blocks(first_image_token)


def test_the_same_image_at_another_table_place_is_reused(qwen3, chat):
    """Fake ids number rows within a request: the same image behind an unused one still matches."""
    a, b, turn, reply = chat
    shifted = Turn(np.where(turn.ids >= qwen3.vocab, turn.ids + Q, turn.ids).astype(np.int32), np.concatenate([b, a]), [("image-b", Q), ("image-a", Q)])
    engine = warm_engine(qwen3)
    run(engine, {"first": (turn, GREEDY)})
    assert run(engine, {"shifted": (shifted, GREEDY)})[0]["shifted"] == reply
    assert engine.prefix_hit_tokens == full_blocks(len(turn.ids) - 1)


def test_an_identical_prompt_still_computes_its_last_token(qwen3):
    ids = text_ids(np.random.default_rng(8), 3 * BLOCK_SIZE)  # exactly three blocks
    turn = Turn(ids, None, None)
    engine = warm_engine(qwen3)
    first = run(engine, {"one": (turn, GREEDY)})[0]["one"]
    assert run(engine, {"two": (turn, GREEDY)})[0]["two"] == first == cold(qwen3, turn)
    assert engine.prefix_hit_tokens == 2 * BLOCK_SIZE  # the third block holds the token that gives the logits


def test_a_bound_of_zero_turns_reuse_off(qwen3, chat):
    a, b, turn, reply = chat
    engine = LLMEngine(qwen3.model, qwen3.cfg.stop_token_id, prefix_cache_bytes=0)
    for rid in ("one", "two"):
        assert run(engine, {rid: (turn, GREEDY)})[0][rid] == reply
    assert engine.prefix_hit_tokens == 0 and engine.prefix_cache.num_blocks == 0 and engine.prefix_cache.nbytes == 0


# ------------------------------------------------------------------ chunked prefill, in-flight batching


@pytest.mark.parametrize("max_num_tokens", [7, 64])
def test_chunked_prefill_before_and_after_the_reused_prefix(qwen3, chat, max_num_tokens):
    a, b, turn, reply = chat
    second = next_turn(turn, reply, np.random.default_rng(9))
    engine = warm_engine(qwen3, max_num_tokens=max_num_tokens)
    first, sizes = run(engine, {"first": (turn, GREEDY)})
    assert first["first"] == reply and len(sizes) > len(turn.ids) // max_num_tokens  # prefilled in chunks
    assert run(engine, {"second": (second, GREEDY)})[0]["second"] == cold(qwen3, second)
    assert engine.prefix_hit_tokens == full_blocks(len(turn.ids))


def test_a_request_joining_while_its_prefix_is_prefilled_computes_it_and_later_ones_reuse_it(qwen3, chat):
    """Blocks are stored once a prompt is fully prefilled; a twin admitted meanwhile finds none."""
    a, b, turn, reply = chat
    engine = warm_engine(qwen3, max_num_tokens=32)
    tokens, _ = run(engine, {"one": (turn, GREEDY), "twin": (turn, GREEDY)})
    assert tokens == {"one": reply, "twin": reply} and engine.prefix_hit_tokens == 0
    assert run(engine, {"three": (turn, GREEDY)})[0]["three"] == reply
    assert engine.prefix_hit_tokens == full_blocks(len(turn.ids) - 1)


# ------------------------------------------------------------------ abort, errors, eviction


def test_a_request_aborted_mid_prefill_stores_nothing(qwen3, chat):
    a, b, turn, reply = chat
    engine = warm_engine(qwen3, max_num_tokens=32)
    tokens, _ = run(engine, {"aborted": (turn, GREEDY)}, aborts={"aborted": 3})
    assert tokens["aborted"] == [] and engine.prefix_cache.num_blocks == 0
    assert run(engine, {"after": (turn, GREEDY)})[0]["after"] == reply
    assert engine.prefix_hit_tokens == 0


def test_a_request_aborted_while_decoding_leaves_correct_blocks(qwen3, chat):
    a, b, turn, reply = chat
    engine = warm_engine(qwen3)
    tokens, _ = run(engine, {"aborted": (turn, GREEDY)}, aborts={"aborted": 3})
    assert 0 < len(tokens["aborted"]) < len(reply)
    assert run(engine, {"after": (turn, GREEDY)})[0]["after"] == reply
    assert engine.prefix_hit_tokens == full_blocks(len(turn.ids) - 1)


def test_a_request_whose_forward_fails_stores_nothing(qwen3, chat):
    a, b, turn, reply = chat
    model = qwen3.model

    class FailsAfterTheFirstChunk:  # the prompt's second chunk raises, for this sequence only
        config = model.config

        def new_cache(self, capacity):
            return model.new_cache(capacity)

        def forward(self, inputs):
            if any(s.start > 0 and s.prompt_table is not None and len(s.token_ids) > 1 for s in inputs):
                raise MemoryError("out of memory for this sequence")
            return model.forward(inputs)

    engine = LLMEngine(FailsAfterTheFirstChunk(), qwen3.cfg.stop_token_id, max_num_tokens=64)
    engine.add_request("bad", turn.ids, turn.table, GREEDY, turn.keys)
    events = []
    while engine.has_work():
        events += engine.step()
    assert events == [TokenEvent("bad", None, "error", "MemoryError: out of memory for this sequence")]
    assert engine.prefix_cache.num_blocks == 0


def test_eviction_keeps_the_byte_bound_and_drops_the_least_recently_used_blocks(qwen3):
    c = qwen3.cfg.text
    block_bytes = 2 * c.num_layers * c.num_kv_heads * BLOCK_SIZE * c.head_dim * 4
    rng = np.random.default_rng(10)
    p1, p2 = (Turn(text_ids(rng, 3 * BLOCK_SIZE + 1), None, None) for _ in range(2))  # three full blocks each
    engine = warm_engine(qwen3, prefix_cache_bytes=5 * block_bytes + block_bytes // 2)
    run(engine, {"p1": (p1, GREEDY)})
    run(engine, {"p2": (p2, GREEDY)})
    cache = engine.prefix_cache
    assert cache.num_blocks == 5 and cache.nbytes == 5 * block_bytes <= cache.max_bytes
    assert run(engine, {"p2-again": (p2, GREEDY)})[0]["p2-again"] == cold(qwen3, p2)
    assert engine.prefix_hit_tokens == 3 * BLOCK_SIZE  # the most recent prompt kept all its blocks
    assert run(engine, {"p1-again": (p1, GREEDY)})[0]["p1-again"] == cold(qwen3, p1)
    assert engine.prefix_hit_tokens == 5 * BLOCK_SIZE  # p1 lost its last block, never its first ones
    assert cache.num_blocks == 5 and cache.nbytes <= cache.max_bytes


# ------------------------------------------------------------------ other decoders


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "llama"])
def test_second_turn_is_exact_on_sliding_window_sinks_and_moe_decoders(family, setups):
    """GPT-OSS: the image prompt is longer than the sliding window (64) of layer 0."""
    setup = setups(family)
    rng = np.random.default_rng(11)
    a, b = random_table(setup, rng, Q), random_table(setup, rng, Q)
    turn = first_turn(setup, rng, a)
    second = next_turn(turn, cold(setup, turn), rng)
    expected = cold(setup, second)
    assert expected != cold(setup, dataclasses.replace(second, table=b))
    engine = warm_engine(setup, max_num_tokens=100)
    run(engine, {"first": (turn, GREEDY)})
    assert run(engine, {"second": (second, GREEDY)})[0]["second"] == expected
    assert engine.prefix_hit_tokens == full_blocks(len(turn.ids))


# ------------------------------------------------------------------ configuration


def test_the_build_setting_reaches_the_llm_model_and_defaults_as_the_engine_does(qwen3, tmp_path):
    from build.repository import common_values, write_repository
    from build.settings import BuildSettings
    from engine.llm.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES

    assert BuildSettings().prefix_cache_mib << 20 == DEFAULT_PREFIX_CACHE_BYTES
    values = common_values(qwen3.cfg, BuildSettings(prefix_cache_mib=0))
    write_repository(tmp_path, "cpu", {**values, "onnx_file": str(tmp_path / "vision_encoder.onnx")})
    assert 'key: "prefix_cache_mib" value: { string_value: "0" }' in (tmp_path / "llm" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="prefix_cache_mib"):
        BuildSettings(prefix_cache_mib=-1)
