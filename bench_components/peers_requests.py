"""Whole requests against the real CPU peer: our OpenAI server (Triton behind it) and llama.cpp's
llama-server (mtmd) on the same generated checkpoint, driven by NVIDIA AIPerf, one server at a time.

    python -m bench_components.peers_requests [--precision float32 ...] [--concurrency 1 4 8] [--requests N] [--rounds N]

The checkpoint: the internvl3_5-1b shape (Qwen3-0.6B + InternViT-300M, seeded weights) written in the
custom format, the one llama.cpp's convert_hf_to_gguf.py reads (InternVLChatModel; its
preprocessor_config.json gives the mmproj its mean/std); converted to the text GGUF
(f32 / f16 / q8_0) and the mmproj (f32 / f16 / q8_0) by bench_components/peers_convert.py. llama-server
is built once from the same llama.cpp source (bench_components/llama_server_build.py). Pairs: PRECISIONS.

Same work first (per image size, on float32): the prompt tokens each server reports in `usage`, and
greedy replies of both to the same images. Then per round (who goes first alternates), per server,
per image size and concurrency, one AIPerf profile: streaming, PROMPT + one image, OUTPUT_TOKENS fixed,
warm-up requests excluded. Results (every run's AIPerf export, and peers_requests.json with the
medians over rounds) under --out; finished runs are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_components.common import ROOT, THREADS, log, machine_info
from bench_components.llama_server_build import ensure_llama_server
from bench_components.peers_aiperf import aiperf_command, ensure_aiperf, read_metrics, run_aiperf, write_input
from bench_components.peers_convert import convert, fetch_converter, llama_cpp_python_version
from bench_components.peers_printable import make_replies_printable
from bench_components.peers_servers import chat, llama_server_command, serve_llama, serve_ours
from bench_components.peers_table import agreement, table, time_spent
from client import triton_metrics
from engine.config import ModelConfig
from launcher.server import TritonServer, free_port

IMAGE_SIZES = ((448, 448), (1280, 720), (1920, 1080))
CONCURRENCY = (1, 4, 8)
# sequences in flight on both servers, the same in every run whatever --concurrency it measures
# (llama-server's -np slots share one KV buffer, -kvu; our in-flight batch): one build per precision
SLOTS = max(CONCURRENCY)
# precision -> (our llm_weights, our vision_precision, llama.cpp's text GGUF, its mmproj GGUF): the same
# weight format on both sides, except float16's vision: ours has none on the CPU (vision_precision is
# float32 or int8), so there our fp32 graph meets llama.cpp's f16 mmproj, its usual download.
PRECISIONS = {
    "float32": ("float32", "float32", "f32", "f32"),
    "float16": ("float16", "float32", "f16", "f16"),
    "int8": ("int8", "int8", "q8_0", "q8_0"),
}
PROMPT = "Describe the image in detail."
OUTPUT_TOKENS = 32
CONTEXT = 32768  # llama-server's shared KV: 8 slots × (13 tiles × 256 + text + reply) fits
SERVERS = ("ours", "llama-server")


def prepare(cache: Path) -> dict:
    """The custom-format checkpoint, its GGUFs, llama-server and AIPerf (each made once)."""
    from build.checkpoint import generate

    checkpoint = cache / "internvl3_5-1b-custom"
    if not (checkpoint / "generated_by.json").is_file():
        generate("internvl3_5-1b", "qwen3", checkpoint, fmt="custom")
    log(f"peers: {make_replies_printable(checkpoint)} tokens can be generated (printable ASCII, bench_components/peers_printable.py)")
    converter = fetch_converter(cache, llama_cpp_python_version())
    texts = convert(checkpoint, converter, cache, outtypes=("f32", "f16", "q8_0"), log=log)
    projectors = convert(checkpoint, converter, cache, outtypes=("f32", "f16", "q8_0"), log=log, mmproj=True)
    # the checkpoint template's default system message, sent to both (ours would add it by itself)
    system = cache / "system_prompt.txt"
    system.write_text(ModelConfig.from_pretrained(checkpoint).system_message or "", encoding="utf-8")
    return {
        "checkpoint": checkpoint, "texts": texts, "projectors": projectors, "system": system,
        "llama_server": ensure_llama_server(cache), "aiperf": ensure_aiperf(cache),
    }  # fmt: skip


def write_images(directory: Path, count: int) -> dict[tuple[int, int], list[Path]]:
    """`count` different synthetic JPEGs per size: no request repeats an image, so neither side's
    caches could help (ours are off in this build anyway, llama-server's prompt cache too)."""
    from client.synthetic import synthetic_image

    paths = {}
    for i, (w, h) in enumerate(IMAGE_SIZES):
        folder = directory / f"{w}x{h}"
        folder.mkdir(parents=True, exist_ok=True)
        paths[(w, h)] = [folder / f"{n:03d}.jpg" for n in range(count)]
        for n, path in enumerate(paths[(w, h)]):
            if not path.is_file():
                path.write_bytes(synthetic_image(1000 * i + n, w, h, "JPEG"))
    return paths


def _messages(image: Path, text: str) -> list[dict]:
    """InternVL's layout on both servers: the image, then a new line and the text (llama-server joins
    parts without a separator; ours puts `<image>\\n` before the text itself)."""
    import base64

    url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def same_work(url: str, model: str, images: dict, server: str, system: str, path: Path) -> dict:
    """Per image size: prompt tokens from `usage`, and the greedy reply (16 tokens) to its first image.
    Kept in path, size by size: a resumed run, or one with other --sizes, asks only for what is missing."""
    out = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for (w, h), paths in images.items():
        if f"{w}x{h}" in out:
            continue
        text = PROMPT if server == "ours" else "\n" + PROMPT
        messages = [{"role": "system", "content": system}, *_messages(paths[0], text)]
        reply = chat(url, model, {"messages": messages, "max_tokens": 16, "temperature": 0})
        out[f"{w}x{h}"] = {"prompt_tokens": reply["usage"]["prompt_tokens"], "reply": reply["choices"][0]["message"]["content"]}
        path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def profile(setup: dict, server: str, url: str, model: str, triton: TritonServer | None, images: dict, args, run_dir: Path, round_index: int) -> None:
    """Per image size, AIPerf at each concurrency; on our server also our `make bench` client at
    concurrency 1 (when that is measured) in the same session, so the two are compared minutes apart:
    before AIPerf's runs of the size or after them, alternating from size to size and from round to
    round, so over two rounds each size has both orders and an order effect cancels in the medians.
    Triton's counters around each run (where_time_went)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for (w, h), paths in images.items():
        bench = triton is not None and 1 in args.concurrency
        bench_first = (round_index + IMAGE_SIZES.index((w, h))) % 2 == 0
        if bench and bench_first:
            bench_client(triton, paths, args, run_dir / f"{w}x{h}-make-bench")
        for concurrency in args.concurrency:
            out = run_dir / f"{w}x{h}-c{concurrency}"
            requests = max(args.requests, concurrency)
            input_file = write_input(run_dir / f"input-{w}x{h}.jsonl", PROMPT, paths)
            command = aiperf_command(
                setup["aiperf"], url, model, setup["checkpoint"], input_file, OUTPUT_TOKENS, concurrency, requests, args.warmup, out, setup["system"]
            )
            log(f"peers: {server} {w}x{h} concurrency {concurrency} ({requests} requests)")
            counted = triton is not None and not (out / "profile_export_aiperf.json").is_file()  # a kept run is not re-run
            with counters(triton, out) if counted else contextlib.nullcontext():
                run_aiperf(command, out)
        if bench and not bench_first:
            bench_client(triton, paths, args, run_dir / f"{w}x{h}-make-bench")


@contextlib.contextmanager
def counters(triton: TritonServer, folder: Path):
    """Writes folder/triton_metrics.json: where_time_went over the `with` block, and the CPU time the
    load generator (the block's child processes, which share the server's cores) took meanwhile."""
    before, started, client = triton_metrics.read(triton.metrics_url), time.monotonic(), _children_cpu_s()
    yield
    spent = where_time_went(triton_metrics.added(before, triton_metrics.read(triton.metrics_url)), time.monotonic() - started)
    spent["client_cpu_s"] = round(_children_cpu_s() - client, 2)
    (folder / "triton_metrics.json").write_text(json.dumps(spent, indent=2), encoding="utf-8")


def _children_cpu_s() -> float:
    """User + system CPU seconds of the child processes waited for so far, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def where_time_went(added: dict, window: float) -> dict:
    """Our server's counters over one AIPerf run (its warm-up requests and start included): busy seconds
    of each step (the vision encoder's executions, the LLM engine's prefill and decode steps, which run
    on the same cores at the same time) and the engine's steps by how many sequences ran together.
    Triton's own compute time is no busy time: it gives each request of a batch the batch's time."""
    def seconds(name: str, **labels: str) -> float:
        return round(triton_metrics.total(added, name, **labels) / 1e6, 2)

    steps = {int(b): int(n) for b, n in triton_metrics.by_label(added, "internvl_llm_steps_total", "batch_size").items() if n}
    return {
        "window_s": round(window, 2),
        "preprocess_s": seconds("nv_inference_compute_infer_duration_us", model="preprocess"),
        "vision_encoder_s": seconds("internvl_vision_encode_duration_us"),
        "vision_tiles": int(triton_metrics.total(added, "internvl_vision_encoded_tiles_total")),
        "llm_prefill_s": seconds("internvl_llm_step_duration_us", phase="prefill"),
        "llm_decode_s": seconds("internvl_llm_step_duration_us", phase="decode"),
        "llm_steps_by_batch_size": dict(sorted(steps.items())),
    }


def bench_client(triton: TritonServer, paths: list[Path], args, folder: Path) -> None:
    """Our own `make bench` client (client.bench, Triton gRPC) at concurrency 1 on these images, to
    check AIPerf's numbers for our server against it (kept: a resumed run skips it), with Triton's
    counters around it as around AIPerf's runs."""
    if (folder / "bench.json").is_file():
        return
    (folder / "image").mkdir(parents=True, exist_ok=True)
    for image in paths:
        shutil.copy(image, folder / "image" / image.name)
    command = [
        sys.executable, "-m", "client.bench", "--url", triton.grpc_url, "--concurrency", "1", "--num-requests", str(args.requests),
        "--warmup", str(args.warmup), "--image-dir", str(folder / "image"), "--prompt-words", "4",
        "--output-tokens", str(OUTPUT_TOKENS), "--results", str(folder),
    ]  # fmt: skip
    with counters(triton, folder):
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def run(args) -> dict:
    cache = args.cache
    setup = prepare(cache)
    images = write_images(args.out / "images", args.warmup + max(args.requests, *args.concurrency))
    images = {size: paths for size, paths in images.items() if f"{size[0]}x{size[1]}" in args.sizes}
    system = setup["system"].read_text(encoding="utf-8")
    for precision in args.precision:
        llm_weights, vision_precision, text, projector = PRECISIONS[precision]
        port = free_port()
        command = llama_server_command(
            setup["llama_server"], setup["texts"][text], setup["projectors"][projector], THREADS, SLOTS, CONTEXT, port
        )
        servers = {
            "ours": lambda: serve_ours(setup["checkpoint"], cache / f"build-{precision}", llm_weights, vision_precision, SLOTS),
            "llama-server": lambda: serve_llama(command, port, args.out / f"llama-server-{precision}.log"),
        }
        for round_index in range(args.rounds):
            order = SERVERS if round_index % 2 == 0 else SERVERS[::-1]
            for server in (s for s in order if s in args.servers):
                with servers[server]() as (url, model, triton):
                    if precision == "float32":
                        same_work(url, model, images, server, system, args.out / f"same_work-{server}.json")
                    run_dir = args.out / precision / server / f"round{round_index}"
                    profile(setup, server, url, model, triton, images, args, run_dir, round_index)
    return write_summary(args.out)


def write_summary(out: Path) -> dict:
    """peers_requests.json (summary) and peers_requests.md (its table) under out."""
    report = summary(out)
    (out / "peers_requests.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "peers_requests.md").write_text("\n".join((table(report["medians"]), agreement(out), time_spent(out))), encoding="utf-8")
    return report


def summary(out: Path) -> dict:
    """Everything finished under out (runs of every invocation): the same-work check, our make bench
    client at concurrency 1, and per precision / server / size-concurrency the medians over rounds."""
    same = {path.stem.removeprefix("same_work-"): json.loads(path.read_text(encoding="utf-8")) for path in sorted(out.glob("same_work-*.json"))}
    bench = {}  # precision -> round -> size -> make bench's level, beside AIPerf's c1 run of that session
    for path in sorted(out.glob("*/ours/round*/*-make-bench/bench.json")):
        level = json.loads(path.read_text(encoding="utf-8"))["levels"][0]
        cell = {k: level[k] for k in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "output_throughput", "request_throughput")}
        precision, round_name = path.parts[-5], path.parts[-3]
        bench.setdefault(precision, {}).setdefault(round_name, {})[path.parent.name.removesuffix("-make-bench")] = cell
    runs: dict = {}
    for export in sorted(out.glob("*/*/round*/*/profile_export_aiperf.json")):
        key, round_name, server, precision = export.parts[-2], export.parts[-3], export.parts[-4], export.parts[-5]
        runs.setdefault(precision, {}).setdefault(server, {}).setdefault(round_name, {})[key] = read_metrics(export)
    rounds = {p: {s: list(r.values()) for s, r in servers.items()} for p, servers in runs.items()}
    return {"machine": machine_info(), "threads": THREADS, "prompt": PROMPT, "output_tokens": OUTPUT_TOKENS,
            "same_work": same, "make_bench_c1": bench, "medians": medians(rounds)}  # fmt: skip


def medians(runs: dict) -> dict:
    """{precision: {server: [round: {size-cN: {metric: {stat: value}}}]}} ->
    {precision: {server: {size-cN: {metric: {stat: median over the rounds that ran it}}}}}."""
    out: dict = {}
    for precision, servers in runs.items():
        for server, rounds in servers.items():
            for key in sorted({k for r in rounds for k in r}):
                present = [r[key] for r in rounds if key in r]
                out.setdefault(precision, {}).setdefault(server, {})[key] = {
                    **{
                        metric: {stat: statistics.median(p[metric][stat] for p in present if metric in p) for stat in stats}
                        for metric, stats in present[0].items()
                    },
                    "rounds": len(present),
                }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench_components.peers_requests", description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", choices=tuple(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--sizes", nargs="+", default=[f"{w}x{h}" for w, h in IMAGE_SIZES], choices=[f"{w}x{h}" for w, h in IMAGE_SIZES], help="image sizes, WxH")
    parser.add_argument("--requests", type=int, default=8, help="measured requests per run (at least the concurrency)")
    parser.add_argument("--warmup", type=int, default=1, help="AIPerf warm-up requests per run, excluded")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the server that goes first alternates")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), help="only these servers' runs (e.g. ours: make bench against AIPerf)")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "peers_requests")
    parser.add_argument("--cache", type=Path, default=ROOT / "artifacts" / "bench" / "peers")
    parser.add_argument("--summary-only", action="store_true", help="only gather the finished runs under --out into the summary and its table")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        write_summary(args.out)
        return
    # a kill of the run unwinds the servers' context managers: tritonserver runs in a session of its own
    # and would outlive an interpreter that exits on SIGTERM without them (seen: an orphaned server)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run(args)


if __name__ == "__main__":
    main()
