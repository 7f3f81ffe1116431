"""Section llm: Qwen3-0.6B shape decode at batch 1 vs transformers generate vs the memory-bandwidth floor,
plus aggregate decode throughput at 4 and 8 concurrent sequences."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import numpy as np

from bench_components.common import CKPT_1B, HEALTH, THREADS, timeit, log, memory_bandwidth, race, summary


def decode_weight_bytes(model) -> dict:
    """Bytes read per decode step: every decoder matrix and norm once, lm_head once (tied: the embedding
    matrix), plus one embedding row for the token's lookup."""
    from engine.llm.int8 import Int8Rows
    from engine.llm.linear import Linear

    def nbytes(t) -> int:
        return t.nbytes if isinstance(t, Linear) else t.numel() * t.element_size()

    import torch

    per_layer = sum(nbytes(t) for layer in model.layers for t in layer.values() if isinstance(t, (torch.Tensor, Linear)))
    final_norm = nbytes(model.final_norm)
    lm_head = nbytes(model.lm_head)
    embed = model.embed  # a tensor, or int8 rows + one fp32 scale each (llm_weights="int8")
    embed_row = embed.in_features + 4 if isinstance(embed, Int8Rows) else embed.shape[1] * embed.element_size()
    return {
        "layers": per_layer,
        "final_norm": final_norm,
        "lm_head": lm_head,
        "embedding_row": embed_row,
        "tied_embeddings": model.tied_embeddings,
        "total": per_layer + final_norm + lm_head + embed_row,
    }


def run_engine(engine, prompts: list[np.ndarray], new_tokens: int) -> dict:
    """Adds every prompt, steps until all are done; -> per-step times and the generated ids."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, None, params)
    steps, outputs = [], {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        start = time.perf_counter()
        events = engine.step()
        steps.append((time.perf_counter() - start, engine.last_batch_size))
        for e in events:
            if e.token_id is not None:
                outputs[e.request_id].append(e.token_id)
    return {"steps": steps, "outputs": outputs}


def bench_llm(out: Path, quick: bool) -> dict:
    import torch

    from build.checkpoint import generate
    from engine.config import ModelConfig
    from engine.llm.engine import LLMEngine
    from engine.llm.model import DecoderLM

    generate("internvl3_5-1b", "qwen3", CKPT_1B)
    torch.set_num_threads(THREADS)
    config = ModelConfig.from_pretrained(CKPT_1B)
    prompt_len, new_tokens = 32, (16 if quick else 64)
    reps = 2 if quick else 3
    log(f"llm: loading DecoderLM fp32 ({torch.get_num_threads()} threads)")
    start = time.perf_counter()
    model = DecoderLM.from_pretrained(CKPT_1B, config.text, torch.float32)
    load_s = time.perf_counter() - start
    weights = decode_weight_bytes(model)
    # The engine never sees its stop token (-1): every run generates exactly new_tokens.
    engine = LLMEngine(model, stop_token_id=-1, max_batch_size=8, max_num_tokens=2048)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, prompt_len).astype(np.int32) for _ in range(8)]

    def decode_times(result):  # steps after the first (the prefill step samples the first token)
        return [t for t, _ in result["steps"][1:]]

    run_engine(engine, prompts[:1], 4)  # warm-up
    bandwidth = {}
    single = []
    our_tokens = None
    log(f"llm: ours batch 1, prompt {prompt_len}, {new_tokens} new tokens, greedy, {reps} reps (+ bandwidth probe between)")
    for rep in range(reps):
        bandwidth.setdefault(THREADS, []).append(memory_bandwidth(0.5 if quick else 1.5, THREADS))
        ok = HEALTH.gate("llm batch 1")
        result = run_engine(engine, prompts[:1], new_tokens)
        ok = HEALTH.probe("llm batch 1") and ok
        our_tokens = result["outputs"]["0"]
        steps = decode_times(result)
        single.append({"prefill_s": result["steps"][0][0], "decode_s": sum(steps), "decode_steps": len(steps), "step_s": steps, "healthy": ok})
    bandwidth_1 = memory_bandwidth(0.5 if quick else 1.5, 1)
    best_bw = max(bandwidth[THREADS])
    ms_per_token = [1e3 * r["decode_s"] / r["decode_steps"] for r in single]
    floor_ms = 1e3 * weights["total"] / (best_bw * 1e9)
    ms_summary = summary(ms_per_token, [r["healthy"] for r in single])  # in ms here
    ms_med = ms_summary["median_s"]
    ours = {
        "threads": THREADS,
        "load_s": load_s,
        "ms_per_token_runs": ms_per_token,
        "ms_per_token_summary": ms_summary,
        "ms_per_token": ms_med,
        "ms_per_token_min": ms_summary["min_s"],
        "median_step_ms": 1e3 * statistics.median([s for r in single for s in r["step_s"]]),
        "tokens_per_s": 1e3 / ms_med,
        "prefill_ms": [1e3 * r["prefill_s"] for r in single],
        "achieved_gb_s": weights["total"] / (ms_med / 1e3) / 1e9,
        "pct_of_floor": floor_ms / ms_med,
    }
    log(
        f"llm: ours {ms_med:.1f} ms/token ({1e3 / ms_med:.2f} tok/s, min {ms_summary['min_s']:.1f} ms; "
        f"per rep {', '.join(f'{m:.0f}' for m in ms_per_token)} ms; bandwidth per rep {', '.join(f'{b:.1f}' for b in bandwidth[THREADS])} GB/s); "
        f"floor {weights['total'] / 1e9:.3f} GB / {best_bw:.1f} GB/s = {floor_ms:.1f} ms -> {100 * floor_ms / ms_med:.0f}% of floor"
    )
    profile = None if quick else _profile_decode(engine, prompts[0])
    kernels = None if quick else _linear_kernels(config.text)
    # Concurrency: aggregate decode throughput once all sequences decode together.
    concurrency = {}
    concurrent_tokens = 16 if quick else 32
    log(f"llm: 4 and 8 concurrent sequences, {concurrent_tokens} new tokens each, {1 if quick else 2} reps")
    for n in (4, 8):
        runs, oks = [], []
        for _ in range(1 if quick else 2):
            ok = HEALTH.gate(f"llm {n} streams")
            result = run_engine(engine, prompts[:n], concurrent_tokens)
            oks.append(HEALTH.probe(f"llm {n} streams") and ok)
            steps = [(t, b) for t, b in result["steps"][1:]]
            assert all(b == n for _, b in steps), f"expected {n} sequences in every decode step, got {set(b for _, b in steps)}"
            runs.append(n * len(steps) / sum(t for t, _ in steps))
        rate = summary(runs, oks)  # tokens/s here
        concurrency[n] = {
            "tokens_per_s_runs": runs,
            "tokens_per_s_summary": rate,
            "tokens_per_s": rate["median_s"],
            "ms_per_step": 1e3 * n / rate["median_s"],
            "vs_one_stream": rate["median_s"] / ours["tokens_per_s"],
        }
        log(f"llm: {n} streams {concurrency[n]['tokens_per_s']:.1f} tok/s aggregate (runs {', '.join(f'{r:.1f}' for r in runs)}) ({concurrency[n]['ms_per_step']:.0f} ms/step, {concurrency[n]['vs_one_stream']:.2f}x one stream)")
    del engine, model
    gc.collect()
    hf = _bench_transformers(prompts[0], new_tokens, reps, our_tokens)
    return {
        "shape": "Qwen3-0.6B (internvl3_5-1b preset), fp32",
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "weight_bytes": weights,
        "bandwidth_gb_s": {"threads_%d" % THREADS: bandwidth[THREADS], "best": best_bw, "threads_1": bandwidth_1},
        "floor_ms_per_token": floor_ms,
        "floor_tokens_per_s": 1e3 / floor_ms,
        "kv_bytes_read_at_last_step": 2 * config.text.num_layers * config.text.num_kv_heads * config.text.head_dim * 4 * (prompt_len + new_tokens),
        "ours": ours,
        "profile": profile,
        "linear_kernels": kernels,
        "concurrency": {str(k): v for k, v in concurrency.items()},
        "concurrency_new_tokens": concurrent_tokens,
        "transformers": hf,
        "speedup_vs_transformers": ours["tokens_per_s"] / hf["tokens_per_s"],
    }


def _linear_kernels(text) -> dict:
    """Why engine/llm/linear.py does not call F.linear: GB/s of one layer-stack's gate|up matmuls (num_layers
    seeded random [2·I, H] matrices, ~0.7 GB for Qwen3-0.6B: nothing stays in cache) at the row counts
    of decode steps, F.linear on the plain weights vs the engine's fp32 Linear (the compiled kernel up
    to 4 rows, oneDNN above), the fp16
    Linear of llm_weights="float16" (FBGEMM) and the int8 Linear of llm_weights="int8" (engine/llm/
    int8.py's AVX2 kernel; each reduced mode's GB/s count its own bytes: a half, a quarter)."""
    import torch
    import torch.nn.functional as F

    from engine.llm.linear import Linear

    gen = torch.Generator().manual_seed(0)
    shape = (2 * text.intermediate_size, text.hidden_size)
    dense = [torch.randn(shape, generator=gen) for _ in range(text.num_layers)]
    engine = [Linear(w) for w in dense]
    half = [Linear(w, precision="float16") for w in dense]
    int8 = [Linear(w, precision="int8") for w in dense]
    nbytes = sum(w.numel() * w.element_size() for w in dense)
    out = {"matrices": f"{len(dense)} x {list(shape)} fp32", "bytes": nbytes, "gb_s": {}}
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, shape[1], generator=gen)
        kinds = {
            "F.linear": (lambda: [F.linear(x, w) for w in dense], nbytes),
            "Linear (engine, float32)": (lambda: [e(x) for e in engine], nbytes),
            "fp16 Linear (llm_weights=float16)": (lambda: [h(x) for h in half], nbytes // 2),
            "int8 Linear (llm_weights=int8)": (lambda: [q(x) for q in int8], nbytes // 4),
        }
        rates = {}
        with torch.inference_mode():
            for name, (run, size) in kinds.items():
                run()
                rates[name] = size / min(timeit(run) for _ in range(3)) / 1e9
        out["gb_s"][str(rows)] = rates
        log(f"llm: weight matmuls, {rows} row(s): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in rates.items()))
    del dense, engine, half, int8
    gc.collect()
    return out


def _profile_decode(engine, prompt: np.ndarray) -> dict:
    """torch.profiler over a few decode steps: torch operator time and calls per step. The compiled
    kernels (engine/llm/cpu_ops.py: the fp32 and int8 weight products at decode, norms, attention) are
    not torch operators, so the profiler does not see them: wall minus operator time is them plus Python."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine.sampling_params import SamplingParams

    engine.add_request("profile", prompt, None, SamplingParams(max_new_tokens=12, do_sample=False))
    engine.step()  # prefill
    engine.step()
    steps = 8
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    events = prof.key_averages()
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    table = {e.key: {"self_ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps} for e in top}
    ops_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    calls = sum(e.count for e in events) / steps
    log(
        f"llm: profile, {steps} decode steps: wall {1e3 * wall / steps:.1f} ms/step (profiler on), "
        f"torch operators' self time {ops_ms:.1f} ms/step over {calls:.0f} calls (the compiled kernels are not among them)"
    )
    return {"wall_ms_per_step": 1e3 * wall / steps, "ops_self_ms_per_step": ops_ms, "op_calls_per_step": calls, "top_ops": table}


def _bench_transformers(prompt: np.ndarray, new_tokens: int, reps: int, our_tokens: list[int] | None) -> dict:
    import torch
    from transformers import InternVLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    log(f"llm: loading transformers InternVLForConditionalGeneration fp32 ({torch.get_num_threads()} threads)")
    start = time.perf_counter()
    model = InternVLForConditionalGeneration.from_pretrained(CKPT_1B, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    ids = torch.as_tensor(prompt, dtype=torch.int64)[None]
    mask = torch.ones_like(ids)

    last = {}

    def gen(n):
        with torch.inference_mode():
            last[n] = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )

    gen(2)  # warm-up
    log(f"llm: transformers generate T(n={new_tokens + 1}) - T(n=1), {reps} reps")
    timed = race({"long": lambda: gen(new_tokens + 1), "short": lambda: gen(1)}, reps, warmup=0, label="transformers generate")
    per_rep = [(lo - sh) / new_tokens for lo, sh in zip(timed["long"]["runs_s"], timed["short"]["runs_s"])]
    per_rep_summary = summary([1e3 * p for p in per_rep], timed["long"]["healthy"])  # in ms
    tokens = last[new_tokens + 1][0, ids.shape[1] : ids.shape[1] + new_tokens].tolist()
    match = 0
    for a, b in zip(tokens, our_tokens or []):
        if a != b:
            break
        match += 1
    ms = per_rep_summary["median_s"]
    log(f"llm: transformers {ms:.1f} ms/token ({1e3 / ms:.2f} tok/s); greedy tokens equal to ours for the first {match}/{len(tokens)}")
    del model
    gc.collect()
    return {
        "load_s": load_s,
        "threads": THREADS,
        "T_long": timed["long"],
        "T_short": timed["short"],
        "ms_per_token_runs": [1e3 * p for p in per_rep],
        "ms_per_token_summary": per_rep_summary,
        "ms_per_token": ms,
        "ms_per_token_min": per_rep_summary["min_s"],
        "tokens_per_s": 1e3 / ms,
        "greedy_prefix_match_with_ours": match,
    }
