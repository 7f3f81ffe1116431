"""Section cache: time to first token of a second turn about the same image, with the vision-feature
cache and prefix reuse (warm) against both off (cold), on the internvl3_5-1b shape, interleaved."""

from __future__ import annotations

import gc
import itertools
from pathlib import Path

from bench_components.common import CKPT_1B, SAMPLE_IMAGE, log, race
from client.synthetic import synthetic_image


def bench_cache(out: Path, quick: bool) -> dict:
    from build.checkpoint import generate
    from engine.pipeline import Pipeline

    generate("internvl3_5-1b", "qwen3", CKPT_1B)
    image = SAMPLE_IMAGE.read_bytes() if SAMPLE_IMAGE.is_file() else synthetic_image(1, 1280, 720, "JPEG")
    warm = Pipeline.from_pretrained(CKPT_1B)
    cold = Pipeline.from_pretrained(CKPT_1B, vision_cache_mib=0, prefix_cache_mib=0)
    try:
        first = warm.generate("Describe the image in detail.", [image], max_new_tokens=16)
        history = [(first.question, first.text)]
        numbers = itertools.count()

        def second_turn(pipe):
            # A new question each call, so a warm call reuses the first turn, never an earlier second turn.
            # One new token: the time is the prompt's prefill and the first token's sampling (TTFT).
            return lambda: pipe.generate(f"Question {next(numbers)}: which colour dominates?", [image], history=history, max_new_tokens=1)

        hits = warm.llm.prefix_hit_tokens
        times = race({"warm": second_turn(warm), "cold": second_turn(cold)}, reps=2 if quick else 5, warmup=1, label="cache ttft")
        prompt_tokens = warm.prepare("Question 0: which colour dominates?", [image], history).prompt.input_ids.size
        calls = 3 if quick else 6  # warm-up + timed calls of the warm pipeline
        result = {
            "checkpoint": str(CKPT_1B),
            "num_tiles": sum(warm.prepare("x", [image]).features.num_tiles),
            "first_turn_prompt_tokens": first.prompt_tokens,
            "second_turn_prompt_tokens": int(prompt_tokens),
            "reused_tokens_per_warm_call": (warm.llm.prefix_hit_tokens - hits) / calls,
            "ttft_warm": times["warm"],
            "ttft_cold": times["cold"],
            "warm_over_cold": times["warm"]["median_s"] / times["cold"]["median_s"],
        }
    finally:
        warm.close()
        cold.close()
        gc.collect()
    log(
        f"cache: second turn TTFT warm {1e3 * result['ttft_warm']['median_s']:.0f} ms vs cold {1e3 * result['ttft_cold']['median_s']:.0f} ms "
        f"({100 * result['warm_over_cold']:.1f}%), {result['reused_tokens_per_warm_call']:.0f} of {result['second_turn_prompt_tokens']} prompt tokens reused"
    )
    return result
