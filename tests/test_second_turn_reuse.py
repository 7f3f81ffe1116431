"""A second turn about the same image, in process: the vision-feature cache serves the image and the
LLM reuses the first turn's prompt KV (≥ 90% of its tokens), token-identical to a cold run, also
while 4 other requests share the batch."""

from __future__ import annotations

import threading

import pytest

from client.synthetic import synthetic_image
from engine.pipeline import Pipeline

IMAGE, OTHER = synthetic_image(41, 800, 600, "PNG"), synthetic_image(42, 600, 800, "PNG")
FIRST, SECOND = "Describe the image.", "What colour dominates?"


@pytest.fixture
def pipes(tiny):  # fresh caches for each test
    with Pipeline.from_pretrained(tiny) as warm, Pipeline.from_pretrained(tiny, vision_cache_mib=0, prefix_cache_mib=0) as cold:
        yield warm, cold


def _second_turn(pipe, image, others: int = 0):
    first = pipe.generate(FIRST, [image], max_new_tokens=10)
    history = [(first.question, first.text)]
    hits = pipe.llm.prefix_hit_tokens
    replies, start = [], threading.Barrier(others + 1)

    def other(i):
        start.wait()
        pipe.generate(f"Count to {i + 3}.", [OTHER] if i % 2 else [], max_new_tokens=24)

    threads = [threading.Thread(target=other, args=(i,)) for i in range(others)]
    for thread in threads:
        thread.start()
    start.wait()
    replies.append(pipe.generate(SECOND, [image], history=history, max_new_tokens=12))
    for thread in threads:
        thread.join()
    return first, replies[0], pipe.llm.prefix_hit_tokens - hits


@pytest.mark.parametrize("others", [0, 4], ids=["alone", "beside 4 others"])
def test_second_turn_reuses_the_first_turns_prompt_with_identical_tokens(pipes, others):
    warm, cold = pipes
    first, second, reused = _second_turn(warm, IMAGE, others)
    _, expected, cold_reused = _second_turn(cold, IMAGE)
    assert second.token_ids == expected.token_ids and cold_reused == 0
    assert reused >= 0.9 * first.prompt_tokens, (reused, first.prompt_tokens)
    assert _second_turn(cold, OTHER)[1].token_ids != expected.token_ids  # the image matters
