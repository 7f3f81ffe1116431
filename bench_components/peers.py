"""Peers: decode tok/s at batch 1 of our LLM engine against llama.cpp, per weight precision, in one run.

    python -m bench_components.peers [--out DIR] [--rounds N] [--prompt-tokens N] [--new-tokens N] [--threads N] [--quick]

(`make bench-peers` installs the `peers` extra first: llama-cpp-python compiled for this CPU, and gguf.)
The model is the language model of the generated internvl3_5-1b checkpoint (Qwen3-0.6B shape, seeded
weights), the same one `python -m bench_components --only llm` times: written as a Qwen3ForCausalLM
directory (bench_components/peers_checkpoint.py), converted by llama.cpp's own convert_hf_to_gguf.py
to f32 / f16 / q8_0 (bench_components/peers_convert.py). Pairs: our llm_weights float32 <-> f32,
float16 <-> f16, int8 <-> q8_0; a pair whose llm_weights is not in engine.llm.precision.LLM_WEIGHTS is
skipped with a note. Both sides run greedy from the same prompt ids with the same thread count, and
only decode steps are timed (prefill excluded): ours the engine's step() after the prefill step,
llama.cpp a one-token llama_decode + argmax (bench_components/peers_llama.py). Rounds interleave every
runner (ours, llama.cpp, next pair, ...; who goes first within a pair alternates per round), one
untimed warm-up run each before the first round, health probes (bench_components/common.py) around every
round; medians over healthy rounds, and the per-round ratio ours / llama.cpp. Writes DIR/peers.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path

from bench_components.common import CKPT_1B, HEALTH, ROOT, log, machine_info, memory_bandwidth, probe_machine, summary

PAIRS = (("float32", "f32"), ("float16", "f16"), ("int8", "q8_0"))  # (our llm_weights, llama.cpp GGUF type)
GOAL = 1.0  # ours / llama.cpp decode tok/s, every pair (issue 16)


def select_pairs(available) -> tuple[list[tuple[str, str]], list[str]]:
    """-> (the pairs whose llm_weights our engine offers, a note per skipped pair)."""
    active, notes = [], []
    for ours, theirs in PAIRS:
        if ours in available:
            active.append((ours, theirs))
        else:
            notes.append(f"skipped: ours {ours} <-> llama.cpp {theirs} (llm_weights={ours!r} is not in engine.llm.precision.LLM_WEIGHTS {tuple(available)})")
    return active, notes


def round_order(active: list[tuple[str, str]], round_index: int) -> list[tuple[str, str]]:
    """[(side, mode)] of one round: pair by pair, ours first in even rounds and llama.cpp first in odd ones."""
    order = []
    for ours, theirs in active:
        pair = [("ours", ours), ("llama.cpp", theirs)]
        order += pair if round_index % 2 == 0 else pair[::-1]
    return order


def decode_rate(run: dict) -> float:
    """Decode tokens/s of one run: decode steps over their summed time (prefill excluded)."""
    return len(run["step_s"]) / sum(run["step_s"])


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def gguf_summary(path: Path) -> dict:
    """Tensor types and bytes of a GGUF, its pre-tokenizer and vocabulary size (read with the released gguf)."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(path)
    types, nbytes = Counter(), Counter()
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] += 1
        nbytes[tensor.tensor_type.name] += int(tensor.n_bytes)
    pre = reader.fields["tokenizer.ggml.pre"]
    return {
        "tensor_types": dict(types),
        "tensor_bytes": dict(nbytes),
        "weight_bytes": sum(nbytes.values()),
        "separate_output_tensor": any(t.name == "output.weight" for t in reader.tensors),  # False: tied head
        "pre_tokenizer": bytes(pre.parts[pre.data[0]]).decode(),
        "tokens": len(reader.fields["tokenizer.ggml.tokens"].data),
    }


class Ours:
    """Our engine with one llm_weights, loaded once; run() is one greedy request at batch 1."""

    def __init__(self, checkpoint: Path, llm_weights: str):
        import torch

        from bench_components.llm import decode_weight_bytes
        from engine.config import ModelConfig
        from engine.llm.engine import LLMEngine
        from engine.llm.model import DecoderLM

        config = ModelConfig.from_pretrained(checkpoint)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = DecoderLM.from_pretrained(checkpoint, config.text, torch.float32, llm_weights)
        self.warnings = [str(w.message) for w in caught]  # e.g. int8 falling back to float16
        try:
            self.weight_bytes = decode_weight_bytes(model)["total"]
        except (AttributeError, TypeError):  # a weight kind decode_weight_bytes cannot size
            self.weight_bytes = None
        # The engine never sees its stop token (-1): every run generates exactly new_tokens.
        self.engine = LLMEngine(model, stop_token_id=-1, max_batch_size=8, max_num_tokens=2048)

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        import numpy as np

        from bench_components.llm import run_engine

        result = run_engine(self.engine, [np.asarray(prompt, dtype=np.int32)], new_tokens)
        return {"prefill_s": result["steps"][0][0], "step_s": [t for t, _ in result["steps"][1:]], "tokens": result["outputs"]["0"]}


def load_runners(active, checkpoint: Path, ggufs: dict, threads: int, n_ctx: int) -> tuple[dict, dict]:
    from bench_components.peers_llama import LlamaDecoder

    runners, info = {}, {}
    for ours, theirs in active:
        start = time.perf_counter()
        runners["ours", ours] = Ours(checkpoint, ours)
        info["ours", ours] = {"load_s": time.perf_counter() - start, "weight_bytes": runners["ours", ours].weight_bytes, "warnings": runners["ours", ours].warnings}
        for message in runners["ours", ours].warnings:
            log(f"peers: ours {ours}: warning at load: {message}")
        start = time.perf_counter()
        runners["llama.cpp", theirs] = LlamaDecoder(ggufs[theirs], threads, n_ctx)
        summary_ = gguf_summary(ggufs[theirs])
        info["llama.cpp", theirs] = {"load_s": time.perf_counter() - start, "weight_bytes": summary_["weight_bytes"], "gguf": str(ggufs[theirs]), "gguf_summary": summary_, "params": runners["llama.cpp", theirs].params}
        log(f"peers: loaded ours {ours} ({info['ours', ours]['load_s']:.1f} s) and llama.cpp {theirs} ({info['llama.cpp', theirs]['load_s']:.1f} s)")
    return runners, info


def race(active, runners: dict, prompt: list[int], new_tokens: int, rounds: int) -> tuple[dict, list[bool]]:
    """-> ({(side, mode): [run per round]}, healthy per round); one untimed warm-up run per runner first."""
    for key, runner in runners.items():
        runner.run(prompt, min(8, new_tokens))
    runs = {key: [] for key in runners}
    healthy = []
    healthy_before = HEALTH.gate("peers round 0")
    for r in range(rounds):
        start = time.perf_counter()
        for key in round_order(active, r):
            runs[key].append(runners[key].run(prompt, new_tokens))
        healthy_after = HEALTH.probe(f"peers round {r}")
        healthy.append(healthy_before and healthy_after)
        rates = ", ".join(f"{side} {mode} {decode_rate(runs[side, mode][-1]):.2f}" for side, mode in round_order(active, 0))
        log(f"peers: round {r + 1}/{rounds} ({time.perf_counter() - start:.0f} s{'' if healthy[-1] else ', THROTTLED'}): tok/s {rates}")
        healthy_before = healthy_after if healthy_after or r == rounds - 1 else HEALTH.gate(f"peers round {r + 1}")
    return runs, healthy


def pair_results(active, runs: dict, healthy: list[bool], info: dict) -> list[dict]:
    out = []
    for ours, theirs in active:
        a, b = runs["ours", ours], runs["llama.cpp", theirs]
        rate_a, rate_b = [decode_rate(x) for x in a], [decode_rate(x) for x in b]
        ratios = [x / y for x, y in zip(rate_a, rate_b)]
        ratio = summary(ratios, healthy)
        sa, sb = summary(rate_a, healthy), summary(rate_b, healthy)
        out.append(
            {
                "ours": ours,
                "llama_cpp": theirs,
                "ours_tokens_per_s": sa,  # summary(): median_s / min_s / runs_s hold tok/s here
                "llama_cpp_tokens_per_s": sb,
                "ratio_per_round": ratios,
                "ratio_median": ratio["median_s"],
                "goal": GOAL,
                "met": ratio["median_s"] >= GOAL,
                "ours_prefill_ms": [1e3 * x["prefill_s"] for x in a],
                "llama_cpp_prefill_ms": [1e3 * x["prefill_s"] for x in b],
                "llama_cpp_perf_eval_tokens_per_s": [1e3 * x["perf_n_eval"] / x["perf_eval_ms"] for x in b if x["perf_eval_ms"] > 0],
                "ours_weight_bytes": info["ours", ours]["weight_bytes"],
                "llama_cpp_weight_bytes": info["llama.cpp", theirs]["weight_bytes"],
                "llama_cpp_gguf": info["llama.cpp", theirs]["gguf_summary"],
                "llama_cpp_params": info["llama.cpp", theirs]["params"],
                "ours_gb_s": info["ours", ours]["weight_bytes"] * sa["median_s"] / 1e9 if info["ours", ours]["weight_bytes"] else None,
                "llama_cpp_gb_s": info["llama.cpp", theirs]["weight_bytes"] * sb["median_s"] / 1e9,
                "greedy_tokens_equal_prefix": prefix_match(a[0]["tokens"], b[0]["tokens"]),
                "ours_load_warnings": info["ours", ours]["warnings"],
            }
        )
    return out


def print_table(results: dict) -> None:
    print(
        f"\ndecode tok/s at batch 1, {results['prompt_tokens']}-token prompt, {results['new_tokens'] - 1} decode steps timed, "
        f"{results['threads']} threads each, {results['rounds']} interleaved rounds (medians over healthy rounds)"
    )
    print(f"{'ours':<9} {'tok/s':>7}   {'llama.cpp':<9} {'tok/s':>7}   {'ours/llama':>10}   {'goal >= 1':<9}  per-round ratios")
    for p in results["pairs"]:
        per_round = " ".join(f"{x:.2f}" for x in p["ratio_per_round"])
        flag = "  [all rounds THROTTLED]" if p["ours_tokens_per_s"]["all_runs_throttled"] else ""
        print(
            f"{p['ours']:<9} {p['ours_tokens_per_s']['median_s']:7.2f}   {p['llama_cpp']:<9} {p['llama_cpp_tokens_per_s']['median_s']:7.2f}   "
            f"{p['ratio_median']:9.2f}x   {'met' if p['met'] else 'NOT met':<9}  {per_round}{flag}"
        )
    for note in results["skipped"]:
        print(note)
    healthy = sum(results["healthy_rounds"])
    print(
        f"healthy rounds {healthy}/{len(results['healthy_rounds'])}; loadavg start {results['probe_start']['loadavg'][0]:.2f} / "
        f"end {results['probe_end']['loadavg'][0]:.2f}; results: {results['results_file']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench_components.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench", help="results (peers.json) and the converted models (peers/) (default artifacts/bench)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads / llama.cpp n_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 16 new tokens: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 2, 16
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed in this environment: run `make bench-peers` (it installs the `peers` extra)")
    import numpy as np
    import torch

    from build.checkpoint import generate
    from engine.llm.precision import LLM_WEIGHTS
    from bench_components.peers_checkpoint import write_llm_checkpoint
    from bench_components.peers_convert import convert, fetch_converter, llama_cpp_python_version
    from bench_components.peers_llama import system_info

    os.chdir(ROOT)
    out = args.out.resolve()
    cache = out / "peers"
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    active, skipped = select_pairs(LLM_WEIGHTS)
    for note in skipped:
        log(f"peers: {note}")
    generate("internvl3_5-1b", "qwen3", CKPT_1B)
    hf_dir = write_llm_checkpoint(CKPT_1B, cache / "qwen3-0.6b")
    converter = fetch_converter(cache, llama_cpp_python_version())
    ggufs = convert(hf_dir, converter, cache, [theirs for _, theirs in active], log=log)
    results = {"command": " ".join([Path(sys.executable).name, "-m", "bench_components.peers", *sys.argv[1:]]), "machine": machine_info(), "llama_cpp": system_info()}
    results.update(threads=args.threads, rounds=args.rounds, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, llm_weights_available=list(LLM_WEIGHTS), skipped=skipped)
    results["probe_start"] = probe_machine("start")
    HEALTH.wait_budget_s = 90.0
    HEALTH.probe("start")
    results["read_gb_s_start"] = memory_bandwidth(1.0, args.threads)
    runners, info = load_runners(active, CKPT_1B, ggufs, args.threads, n_ctx=max(256, args.prompt_tokens + args.new_tokens))
    prompt = np.random.default_rng(0).integers(0, 1000, args.prompt_tokens).tolist()  # as bench_components.llm
    log(f"peers: race, {len(runners)} runners, {args.rounds} rounds of prompt {args.prompt_tokens} + {args.new_tokens} new tokens, {args.threads} threads")
    runs, healthy = race(active, runners, prompt, args.new_tokens, args.rounds)
    results["pairs"] = pair_results(active, runs, healthy, info)
    results["healthy_rounds"] = healthy
    del runners
    gc.collect()
    results["read_gb_s_end"] = memory_bandwidth(1.0, args.threads)
    results["probe_end"] = probe_machine("end")
    results["health"] = {"waited_s": HEALTH.waited_s, "log": HEALTH.log}
    results["runtime_s"] = time.perf_counter() - started
    results["results_file"] = str(out / "peers.json")
    results["timing"] = (
        "decode only: ours = engine.step() after the prefill step; llama.cpp = perf_counter around llama_decode of one token + argmax "
        "(llama_cpp_perf_eval_tokens_per_s: llama.cpp's own t_eval_ms/n_eval over the same steps)"
    )
    (out / "peers.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print_table(results)
    log(f"peers: done in {results['runtime_s']:.0f} s; read bandwidth {results['read_gb_s_start']:.1f} / {results['read_gb_s_end']:.1f} GB/s (start/end)")


if __name__ == "__main__":
    main()
