"""Section guided: decode tokens/s of the CPU engine with a JSON-schema guide (engine/llm/guided.py)
against the same requests without one, at batch 1 and 8, on the internvl3_5-1b shape (Qwen3-0.6B,
151,936-token vocabulary); interleaved rounds in alternating order, prefill and warm-up excluded."""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench_components.common import CKPT_1B, HEALTH, THREADS, log, summary

PROMPT = 32
# one long string: the grammar stays open for every timed step, so each one fills and applies a mask
SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}}, "required": ["text"]}


def _steps(engine, batch: int, params, prompt: np.ndarray) -> list[float]:
    """Adds `batch` requests, runs them to their length cut -> seconds of each step after the prefill."""
    for i in range(batch):
        engine.add_request(f"r{i}", prompt, None, params)
    engine.step()  # prefill of all of them (max_num_tokens covers batch × PROMPT)
    times = []
    while engine.has_work():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[:-1] if len(times) > 1 else times  # the last step only retires


def bench_guided(out: Path, quick: bool) -> dict:
    import torch

    from build.checkpoint import generate
    from engine.config import ModelConfig
    from engine.llm.engine import LLMEngine
    from engine.llm.guided import GuideCompiler, tokenizer_info
    from engine.llm.model import DecoderLM
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import load_tokenizer

    generate("internvl3_5-1b", "qwen3", CKPT_1B)
    torch.set_num_threads(THREADS)
    config = ModelConfig.from_pretrained(CKPT_1B)
    model = DecoderLM.from_pretrained(CKPT_1B, config.text)
    guides = GuideCompiler(lambda: tokenizer_info(load_tokenizer(CKPT_1B), [config.stop_token_id]), config.text.vocab_size)
    start = time.perf_counter()
    guides.compile("json_schema", json.dumps(SCHEMA))  # compiled once; every request then hits the cache
    compile_s = time.perf_counter() - start
    rounds, new_tokens = (2, 8) if quick else (5, 24)
    prompt = np.random.default_rng(0).integers(0, 1000, PROMPT).astype(np.int32)
    # min_new_tokens: neither side stops early, so both time the same steps
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, seed=1)
    variants = {"unguided": SamplingParams(**common), "json_schema": SamplingParams(**common, guide_type="json_schema", guide=json.dumps(SCHEMA))}
    result = {"shape": "Qwen3-0.6B (internvl3_5-1b preset), fp32", "schema": SCHEMA, "compile_s": compile_s, "new_tokens": new_tokens, "batches": {}}
    log(f"guided: schema compiled in {compile_s:.2f} s; {rounds} rounds of {new_tokens} tokens, batch 1 and 8, {THREADS} threads")
    for batch in (1, 8):
        engine = LLMEngine(model, config.stop_token_id, max_batch_size=batch, max_num_tokens=batch * PROMPT, prefix_cache_bytes=0, guides=guides)
        for params in variants.values():
            _steps(engine, batch, params, prompt)  # warm-up
        step_s = {name: [] for name in variants}
        healthy = []
        for r in range(rounds):
            ok = HEALTH.gate(f"guided batch {batch}")
            for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                step_s[name].append(statistics.median(_steps(engine, batch, variants[name], prompt)))
            healthy.append(HEALTH.probe(f"guided batch {batch}") and ok)
            log(f"guided: batch {batch} round {r}: " + ", ".join(f"{n} {1e3 * t[-1]:.1f} ms/step" for n, t in step_s.items()))
        s = {name: summary(t, healthy) for name, t in step_s.items()}
        slower = [g / u - 1 for g, u in zip(step_s["json_schema"], step_s["unguided"])]
        result["batches"][str(batch)] = {
            "step_s": s,
            "tokens_per_s": {name: batch / v["median_s"] for name, v in s.items()},
            "slower_per_round": slower,
            "slower": statistics.median(slower),
        }
        log(f"guided: batch {batch}: {100 * statistics.median(slower):+.1f}% step time with the guide (median of per-round ratios)")
        del engine
    del model
    gc.collect()
    return result
