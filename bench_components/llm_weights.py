"""Section weights: the Qwen3-0.6B shape's decode at batch 1 and a 128-token prefill per stored weight
precision (llm_weights float32 / float16 / int8), each with the compiled decode kernels
(engine/llm/cpu_ops.py) and without them (the same arithmetic as torch operators), interleaved
rounds in alternating order, warm-ups excluded; plus torch operator calls per decode step."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import numpy as np

from bench_components.common import CKPT_1B, HEALTH, THREADS, log, summary

PROMPT, PREFILL = 32, 128


def _run(model, ids: np.ndarray, new_tokens: int) -> tuple[list[float], list[int]]:
    from engine.llm.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(model, stop_token_id=-1, max_batch_size=8, max_num_tokens=2048, prefix_cache_bytes=0)
    engine.add_request("r", ids, None, SamplingParams(max_new_tokens=new_tokens))
    times, tokens = [], []
    while engine.has_work():
        start = time.perf_counter()
        events = engine.step()
        times.append(time.perf_counter() - start)
        tokens += [e.token_id for e in events if e.token_id is not None]
    return times, tokens


def _op_calls_per_step(model, ids: np.ndarray) -> float:
    from torch.profiler import ProfilerActivity, profile

    from engine.llm.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(model, stop_token_id=-1, max_batch_size=8, max_num_tokens=2048, prefix_cache_bytes=0)
    engine.add_request("p", ids, None, SamplingParams(max_new_tokens=8))
    engine.step()  # prefill
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            engine.step()
    return sum(e.count for e in prof.key_averages()) / 4


def bench_llm_weights(out: Path, quick: bool) -> dict:
    import torch

    from build.checkpoint import generate
    from engine.config import ModelConfig
    from engine.llm.model import DecoderLM
    from engine.llm.precision import LLM_WEIGHTS

    generate("internvl3_5-1b", "qwen3", CKPT_1B)
    torch.set_num_threads(THREADS)
    config = ModelConfig.from_pretrained(CKPT_1B)
    rounds, new_tokens = (2, 8) if quick else (5, 32)
    models = {}
    for weights in LLM_WEIGHTS:
        model = DecoderLM.from_pretrained(CKPT_1B, config.text, llm_weights=weights)
        models[weights] = model
        unfused = DecoderLM.__new__(DecoderLM)  # the same stored weights, torch operators instead of the kernels
        unfused.__dict__.update(model.__dict__, ops=None)
        models[f"{weights}, torch ops"] = unfused
    rng = np.random.default_rng(0)
    prompt, long_prompt = rng.integers(0, 1000, PROMPT).astype(np.int32), rng.integers(0, 1000, PREFILL).astype(np.int32)
    calls = {name: _op_calls_per_step(m, prompt) for name, m in models.items()}
    for m in models.values():
        _run(m, prompt, 3)  # warm-up
    decode = {name: [] for name in models}
    prefill = {name: [] for name in models}
    healthy = {name: [] for name in models}
    tokens = {}
    log(f"weights: {len(models)} variants x {rounds} rounds, prompt {PROMPT}, {new_tokens} new tokens, prefill {PREFILL}, {THREADS} threads")
    for r in range(rounds):
        for name in list(models) if r % 2 == 0 else list(models)[::-1]:
            ok = HEALTH.gate(f"weights {name}")
            times, tokens[name] = _run(models[name], prompt, new_tokens)
            decode[name].append(statistics.median(times[1:]))
            prefill[name].append(_run(models[name], long_prompt, 1)[0][0])
            healthy[name].append(HEALTH.probe(f"weights {name}") and ok)
            log(f"weights: round {r} {name}: decode {1e3 * decode[name][-1]:.1f} ms/token, prefill {1e3 * prefill[name][-1]:.0f} ms")
    result = {"shape": "Qwen3-0.6B (internvl3_5-1b preset), batch 1", "prompt_tokens": PROMPT, "new_tokens": new_tokens, "prefill_tokens": PREFILL, "variants": {}}
    for name in models:
        d = summary(decode[name], healthy[name])
        result["variants"][name] = {
            "decode_s_per_token": d,
            "tokens_per_s": 1 / d["median_s"],
            "prefill_s": summary(prefill[name], healthy[name]),
            "op_calls_per_step": calls[name],
            "greedy_equal_fp32": sum(a == b for a, b in zip(tokens[name], tokens["float32"])),
        }
        log(f"weights: {name}: {1e3 * d['median_s']:.1f} ms/token ({1 / d['median_s']:.1f} tok/s), {calls[name]:.0f} op calls/step")
    del models
    gc.collect()
    return result
