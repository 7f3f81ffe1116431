"""The results table: one row per measured number with its baseline, target and whether it is met."""

from __future__ import annotations

from bench_components.common import TARGETS


def throttle_flag(*summaries) -> str:
    if any(s.get("all_runs_throttled") for s in summaries):
        return " [THROTTLED VM: all runs]"
    excluded = sum(s.get("throttled_runs_excluded", 0) for s in summaries)
    return f" [{excluded} throttled run(s) excluded]" if excluded else ""


def table_rows(results: dict) -> list[dict]:
    rows = []

    def row(section, metric, value, baseline="", result="", target="", met=None, timings=()):
        result += throttle_flag(*timings)
        rows.append({"section": section, "metric": metric, "value": value, "baseline": baseline, "result": result, "target": target, "met": met})

    if "preprocess" in results:
        p = results["preprocess"]
        by_cores = p["by_cores"]
        top = by_cores[max(by_cores, key=int)]
        ours, seed = top["ours"], top["seed"]
        row(
            "preprocess",
            f"1920x1080 JPEG -> {p['single']['tiles']} tiles, latency (median/min of rounds)",
            f"{1e3 * ours['single']['median_s']:.1f} / {1e3 * ours['single']['min_s']:.1f} ms",
            f"seed {1e3 * seed['single']['median_s']:.1f} / {1e3 * seed['single']['min_s']:.1f} ms",
            f"{top['single_speedup']:.2f}x",
            f">= {TARGETS['pre_single']}x",
            top["single_speedup"] >= TARGETS["pre_single"],
            (ours["single"], seed["single"]),
        )
        ips = top["images_per_s"]
        row(
            "preprocess",
            f"32 mixed images ({p['batch']['tiles']} tiles), throughput",
            f"{ips['ours']:.1f} img/s",
            f"seed {ips['seed']:.1f} img/s",
            f"{top['batch_speedup']:.2f}x",
            f">= {TARGETS['pre_batch']}x",
            top["batch_speedup"] >= TARGETS["pre_batch"],
            (ours["batch"], seed["batch"]),
        )
        if "seed_torch1" in top:
            t1 = top["seed_torch1"]
            row(
                "preprocess",
                "  info: vs the seed with torch at 1 thread: single, 32 images",
                f"{1e3 * ours['single']['median_s']:.1f} ms, {ips['ours']:.1f} img/s",
                f"seed {1e3 * t1['single']['median_s']:.1f} ms, {ips['seed_torch1']:.1f} img/s",
                f"{t1['single']['median_s'] / ours['single']['median_s']:.2f}x, {ips['ours'] / ips['seed_torch1']:.2f}x",
            )
        for cores, r in sorted(by_cores.items(), key=lambda kv: -int(kv[0]))[1:]:
            row(
                "preprocess",
                f"  info: pinned to {cores} core(s): single, 32 images",
                f"{1e3 * r['ours']['single']['median_s']:.1f} ms, {r['images_per_s']['ours']:.1f} img/s",
                f"seed {1e3 * r['seed']['single']['median_s']:.1f} ms, {r['images_per_s']['seed']:.1f} img/s",
                f"{r['single_speedup']:.2f}x, {r['batch_speedup']:.2f}x",
            )
    if "vision" in results:
        v = results["vision"]
        batches = v["batches"]
        torch_cfg = v["configs"]["torch_eager"]
        for n in reversed(batches):
            ort = v["configs"]["ort_default"][str(n)]
            ratio = v["speedup_ort_vs_torch"][str(n)]
            row(
                "vision",
                f"ORT (engine default) vs torch eager, {n} tiles",
                f"{ort['tiles_per_s']:.3f} tiles/s ({ort['gflops']:.0f} GF/s)",
                f"torch {torch_cfg[str(n)]['tiles_per_s']:.3f} tiles/s ({torch_cfg[str(n)]['gflops']:.0f} GF/s)",
                f"{ratio:.2f}x",
                f">= {TARGETS['vision']}x",
                ratio >= TARGETS["vision"],
                (ort, torch_cfg[str(n)]),
            )
        if "int8" in v:  # vision_precision="int8": raced in the same rounds as the fp32 ORT session
            q = v["int8"]
            for n in reversed(batches):
                int8, fp32 = v["configs"]["ort_int8"][str(n)], v["configs"]["ort_default"][str(n)]
                row(
                    "vision",
                    f"  int8 graph (vision_precision=int8) vs fp32 ORT, {n} tiles",
                    f"{int8['tiles_per_s']:.3f} tiles/s",
                    f"fp32 {fp32['tiles_per_s']:.3f}; min cos {q['min_cosine']:.5f}, max|Δ| {q['max_abs_diff']:.1e} ({q['tiles']} tiles)",
                    f"{q['speedup_vs_fp32'][str(n)]:.2f}x fp32",
                    timings=(int8, fp32),
                )
        for name, cfg in v["configs"].items():
            if name in ("ort_default", "torch_eager", "ort_int8"):
                continue
            r = cfg["1"]
            row(
                "vision",
                f"  variant {name}, 1 tile",
                f"{r['tiles_per_s']:.3f} tiles/s",
                f"default {r['default_same_race']['tiles_per_s']:.3f}; max|Δ| vs torch {cfg['max_abs_diff_vs_torch']:.1e}",
                f"{r['vs_default']:.2f}x default",
                timings=(r, r["default_same_race"]),
            )
        row("vision", "  fastest fp32 ORT config", v["fastest_fp32_ort_config"])
    if "vision_runs" in results:  # engine/vision.py TILES_PER_RUN
        r = results["vision_runs"]
        for graph in ("fp32", "int8"):
            one, whole = r[graph]["one_tile"], r[graph]["whole_batch"]
            row(
                "vision",
                f"  {graph} graph, {r['tiles']} tiles: one tile per run vs one run (first run of the shape)",
                f"{one['tiles_per_s']:.3f} tiles/s ({one['first_run_s']:.1f} s)",
                f"one run {whole['tiles_per_s']:.3f} ({whole['first_run_s']:.1f} s)",
                f"{r[graph]['speedup']:.2f}x",
                timings=(one, whole),
            )
    if "llm" in results:
        m = results["llm"]
        o, hf = m["ours"], m["transformers"]
        row(
            "llm",
            "decode batch 1 vs bandwidth floor",
            f"{o['ms_per_token']:.1f} ms/tok, {o['tokens_per_s']:.2f} tok/s, {o['achieved_gb_s']:.1f} GB/s",
            f"floor {m['floor_ms_per_token']:.1f} ms/tok ({m['weight_bytes']['total'] / 1e9:.2f} GB @ {m['bandwidth_gb_s']['best']:.1f} GB/s)",
            f"{100 * o['pct_of_floor']:.0f}% of floor",
            f">= {100 * TARGETS['llm_floor']:.0f}%",
            o["pct_of_floor"] >= TARGETS["llm_floor"],
            (o["ms_per_token_summary"],),
        )
        if m.get("profile"):
            p = m["profile"]
            row("llm", "  info: decode step profile", f"{p['ops_self_ms_per_step']:.1f} ms in torch operators", f"of {p['wall_ms_per_step']:.1f} ms/step (profiler on; the rest: compiled kernels, Python)", f"{p['op_calls_per_step']:.0f} op calls/step")
        for rows_, rates in (m.get("linear_kernels") or {}).get("gb_s", {}).items():
            plain, fp32 = rates["F.linear"], rates["Linear (engine, float32)"]
            row("llm", f"  info: gate|up weight matmuls, {rows_} row(s)", f"engine {fp32:.1f} GB/s", f"F.linear {plain:.1f} GB/s", f"{fp32 / plain:.2f}x")
            if (half := rates.get("fp16 Linear (llm_weights=float16)")) is not None:
                # its GB/s count half the bytes: time ratio to the engine's fp32 Linear = 2 · half / fp32
                row("llm", f"  info: fp16 Linear (llm_weights=float16), {rows_} row(s)", f"{half:.1f} GB/s of fp16", f"engine fp32 {fp32:.1f} GB/s", f"{2 * half / fp32:.2f}x faster")
            if (int8 := rates.get("int8 Linear (llm_weights=int8)")) is not None:  # a quarter of the bytes
                row("llm", f"  info: int8 Linear (llm_weights=int8), {rows_} row(s)", f"{int8:.1f} GB/s of int8", f"engine fp32 {fp32:.1f} GB/s", f"{4 * int8 / fp32:.2f}x faster")
        row(
            "llm",
            "decode batch 1 vs transformers generate",
            f"{o['tokens_per_s']:.2f} tok/s (min {o['ms_per_token_min']:.1f} ms)",
            f"HF {hf['tokens_per_s']:.2f} tok/s ({hf['ms_per_token']:.1f} ms/tok)",
            f"{m['speedup_vs_transformers']:.2f}x",
            f">= {TARGETS['llm_hf']}x",
            m["speedup_vs_transformers"] >= TARGETS["llm_hf"],
            (o["ms_per_token_summary"], hf["ms_per_token_summary"]),
        )
        for n, c in m["concurrency"].items():
            target = TARGETS["llm_8x"] if n == "8" else None
            row(
                "llm",
                f"aggregate decode, {n} concurrent sequences",
                f"{c['tokens_per_s']:.1f} tok/s ({c['ms_per_step']:.0f} ms/step)",
                f"1 stream {o['tokens_per_s']:.2f} tok/s",
                f"{c['vs_one_stream']:.2f}x",
                f">= {target}x" if target else "",
                c["vs_one_stream"] >= target if target else None,
                (c["tokens_per_s_summary"], o["ms_per_token_summary"]),
            )
    if "weights" in results:
        w = results["weights"]["variants"]
        base = w["float32"]["decode_s_per_token"]["median_s"]
        for name, v in w.items():
            d = v["decode_s_per_token"]
            row(
                "weights",
                f"decode batch 1, llm_weights={name}",
                f"{v['tokens_per_s']:.1f} tok/s ({1e3 * d['median_s']:.1f} ms)",
                f"float32 {1e3 * base:.1f} ms, {v['op_calls_per_step']:.0f} op calls/step",
                f"{base / d['median_s']:.2f}x float32, greedy {v['greedy_equal_fp32']}/{results['weights']['new_tokens']} = fp32",
                timings=(d,),
            )
    if "guided" in results:
        for batch, g in results["guided"]["batches"].items():
            tps, steps = g["tokens_per_s"], g["step_s"]
            row(
                "guided",
                f"decode with a JSON-schema guide, batch {batch}",
                f"{tps['json_schema']:.2f} tok/s",
                f"unguided {tps['unguided']:.2f} tok/s",
                f"{100 * g['slower']:+.1f}% step time (median of rounds)",
                f"<= +{100 * TARGETS['guided']:.0f}%",
                g["slower"] <= TARGETS["guided"],
                (steps["json_schema"], steps["unguided"]),
            )
    if "triton" in results:
        for name, t in results["triton"]["configs"].items():
            row(
                "triton",
                f"TTFT, {len(t['images'])} image(s), {t['num_tiles']} tile(s) + question, {name}",
                f"{1e3 * t['ttft_triton']['median_s']:.1f} ms (min {1e3 * t['ttft_triton']['min_s']:.1f})",
                f"in-process {1e3 * t['ttft_inprocess_first_token']['median_s']:.1f} ms (min {1e3 * t['ttft_inprocess_first_token']['min_s']:.1f})",
                f"{100 * t['overhead']:+.1f}% ({t['overhead_ms']:+.1f} ms)",
                f"<= {100 * TARGETS['ttft']:.0f}%",
                t["overhead"] <= TARGETS["ttft"],
                (t["ttft_triton"], t["ttft_inprocess_first_token"]),
            )
    if "cache" in results:
        c = results["cache"]
        row(
            "cache",
            f"second-turn TTFT, same image ({c['num_tiles']} tiles, {c['second_turn_prompt_tokens']} prompt tokens), internvl3_5-1b",
            f"warm {1e3 * c['ttft_warm']['median_s']:.0f} ms",
            f"cold {1e3 * c['ttft_cold']['median_s']:.0f} ms",
            f"{100 * c['warm_over_cold']:.1f}% of cold",
            f"<= {100 * TARGETS['cache_warm']:.0f}%",
            c["warm_over_cold"] <= TARGETS["cache_warm"],
            (c["ttft_warm"], c["ttft_cold"]),
        )
    return rows


def print_table(rows: list[dict]) -> None:
    headers = ("section", "metric", "value", "baseline", "result", "target", "met")
    cells = [[r["section"], r["metric"], str(r["value"]), r["baseline"], r["result"], r["target"], "" if r["met"] is None else ("yes" if r["met"] else "NO")] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)] if cells else [len(h) for h in headers]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
