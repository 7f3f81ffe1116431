"""`make bench-peers`' whole-request comparison, the parts that run without llama-server or AIPerf: the
AIPerf and llama-server command lines, the request layout both servers get, the medians over rounds,
and the pinned AIPerf environment."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

from bench_components.peers_aiperf import REQUIREMENTS, aiperf_command, read_metrics, write_input
from bench_components import peers_requests
from bench_components.peers_requests import PRECISIONS, _messages, medians, summary
from bench_components.peers_convert import OUTTYPES
from bench_components.peers_servers import llama_server_command
from bench_components.peers_table import agreement, table, time_spent
from build.settings import LLM_WEIGHTS
from engine.vision_precision import VISION_PRECISIONS


def _flags(command: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i, word in enumerate(command):
        if word.startswith("-"):
            value = command[i + 1] if i + 1 < len(command) and not command[i + 1].startswith("--") else ""
            out.setdefault(word, []).append(value)
    return out


def test_aiperf_fixes_the_output_length_on_both_servers(tmp_path):
    command = aiperf_command(Path("aiperf"), "http://127.0.0.1:9", "m", tmp_path, tmp_path / "in.jsonl", 32, 4, 8, 1, tmp_path / "out", tmp_path / "s.txt")
    flags = _flags(command)
    assert command[:2] == ["aiperf", "profile"] and flags["--system-prompt-file"] == [str(tmp_path / "s.txt")]
    assert flags["--osl"] == ["32"] and flags["--osl-stddev"] == ["0"]
    # ours reads min_tokens (vLLM's extra), llama-server ignore_eos: each ignores the other's
    assert sorted(flags["--extra-inputs"]) == ["ignore_eos:true", "min_tokens:32", "temperature:0"]  # greedy on both
    assert flags["--concurrency"] == ["4"] and flags["--request-count"] == ["8"] and flags["--warmup-request-count"] == ["1"]
    assert "--use-server-token-count" in flags and "--streaming" in flags
    # paced attempts under the cap: AIPerf's concurrency-only burst mode spins a core at 100%
    assert flags["--request-rate"] == ["20"] and flags["--arrival-pattern"] == ["constant"]
    assert Path(flags["--tokenizer"][0]).is_absolute()  # AIPerf treats only an absolute path as local (no hub here)


def test_aiperf_input_has_a_line_per_image_with_the_prompt(tmp_path):
    images = [tmp_path / f"{n}.jpg" for n in range(3)]
    lines = write_input(tmp_path / "in.jsonl", "Describe.", images).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"text": "Describe.", "image": str(i.resolve())} for i in images]


def test_both_servers_get_the_image_before_the_text(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8\xff")
    (message,) = _messages(image, "\nWhat is it?")
    assert [p["type"] for p in message["content"]] == ["image_url", "text"]
    assert message["content"][0]["image_url"]["url"] == "data:image/jpeg;base64,/9j/"


def test_llama_server_gets_the_same_threads_and_one_slot_per_concurrent_request():
    command = llama_server_command(Path("llama-server"), Path("t.gguf"), Path("p.gguf"), 2, 8, 32768, 8080)
    flags = _flags(command)
    assert flags["-t"] == flags["-tb"] == ["2"] and flags["-np"] == ["8"] and flags["--mmproj"] == ["p.gguf"]
    assert "-kvu" in flags and flags["-c"] == ["32768"]


def test_same_work_asks_only_for_the_sizes_not_kept(tmp_path, monkeypatch):
    asked = []

    def chat(url, model, body):
        asked.append(body["messages"][1]["content"][1]["text"])
        return {"usage": {"prompt_tokens": 400 + len(asked)}, "choices": [{"message": {"content": "r"}}]}

    monkeypatch.setattr(peers_requests, "chat", chat)
    kept = tmp_path / "same_work-llama-server.json"
    kept.write_text(json.dumps({"448x448": {"prompt_tokens": 406, "reply": "a"}}))
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8\xff")
    images = {(448, 448): [image], (1920, 1080): [image]}
    out = peers_requests.same_work("u", "m", images, "llama-server", "sys", kept)
    assert asked == ["\n" + peers_requests.PROMPT]  # only 1920x1080; llama-server gets the new line ours adds itself
    assert out == {"448x448": {"prompt_tokens": 406, "reply": "a"}, "1920x1080": {"prompt_tokens": 401, "reply": "r"}}
    assert json.loads(kept.read_text()) == out


def test_medians_over_rounds():
    def run(ttft: float) -> dict:
        return {"448x448-c1": {"time_to_first_token": {"p50": ttft, "p99": 2 * ttft}}}

    result = medians({"float32": {"ours": [run(1.0), run(3.0), run(2.0)]}})
    assert result["float32"]["ours"]["448x448-c1"] == {"time_to_first_token": {"p50": 2.0, "p99": 4.0}, "rounds": 3}


def test_the_summary_gathers_every_finished_run_of_every_invocation(tmp_path):
    for round_name, ttft in (("round0", 10.0), ("round1", 30.0)):
        run = tmp_path / "float32" / "ours" / round_name / "448x448-c1"
        run.mkdir(parents=True)
        (run / "profile_export_aiperf.json").write_text(json.dumps({"time_to_first_token": {"p50": ttft, "p99": ttft}}))
    (tmp_path / "float32" / "llama-server" / "round0" / "448x448-c4").mkdir(parents=True)  # started, never finished
    (tmp_path / "same_work-ours.json").write_text(json.dumps({"448x448": {"prompt_tokens": 406}}))
    report = summary(tmp_path)
    assert report["medians"] == {"float32": {"ours": {"448x448-c1": {"time_to_first_token": {"p50": 20.0, "p99": 20.0}, "rounds": 2}}}}
    assert report["same_work"] == {"ours": {"448x448": {"prompt_tokens": 406}}}


def test_aiperf_export_is_read_by_its_metric_names(tmp_path):
    export = {"time_to_first_token": {"unit": "ms", "p50": 10.0, "p99": 20.0, "avg": 12.0}, "request_throughput": {"avg": 0.5}}
    (tmp_path / "x.json").write_text(json.dumps(export))
    assert read_metrics(tmp_path / "x.json") == {"time_to_first_token": {"p50": 10.0, "p99": 20.0}, "request_throughput": {"avg": 0.5}}


def test_aiperf_is_pinned_with_everything_it_resolved_to():
    lines = [line for line in REQUIREMENTS.read_text().splitlines() if line.strip()]
    assert "aiperf==0.13.0" in lines and all("==" in line for line in lines)


def test_each_precision_pairs_the_same_weight_formats_where_ours_has_them():
    gguf = {"float32": "f32", "float16": "f16", "int8": "q8_0"}
    assert set(PRECISIONS) == set(gguf)
    for precision, (llm_weights, vision_precision, text, mmproj) in PRECISIONS.items():
        assert llm_weights == precision and llm_weights in LLM_WEIGHTS and text == mmproj == gguf[precision]
        assert vision_precision in VISION_PRECISIONS
        # ours has no fp16 vision on the CPU: float16 keeps the fp32 graph, the others match
        assert vision_precision == ("float32" if precision == "float16" else precision)
        assert text in OUTTYPES


def test_the_benchmark_checkpoint_replies_in_printable_ascii(tmp_path):
    """Greedy replies of the changed checkpoint are whole printable characters token by token (so both
    servers stream every token); the unchanged one's are not (the change is what does it)."""
    import shutil

    from bench_components.peers_printable import MARK, make_replies_printable
    from build.checkpoint import generate
    from client.synthetic import synthetic_image
    from engine.pipeline import Pipeline
    from engine.tokenizer import TextTokenizer

    changed = generate("tiny", "qwen3", tmp_path / "changed", fmt="custom")
    original = shutil.copytree(changed, tmp_path / "original")
    kept = make_replies_printable(changed)
    assert json.loads((changed / "generated_by.json").read_text())[MARK] and 0 < kept < 151936
    assert make_replies_printable(changed) == kept  # once: a second call changes nothing
    tokens = TextTokenizer(changed)

    def printable(ids) -> bool:
        return all(t and t.isascii() and t.isprintable() for t in tokens.token_texts(ids))

    replies = {}
    for name, path in (("changed", changed), ("original", original)):
        with Pipeline.from_pretrained(path, vision_backend="torch") as pipe:
            replies[name] = [
                pipe.generate(q, [synthetic_image(seed, 640, 480, "JPEG")], max_new_tokens=16, min_new_tokens=16).token_ids
                for seed, q in ((1, "Describe the image."), (2, "What is this?"), (3, "Tell me more."))
            ]  # fmt: skip
    assert all(printable(ids) and len(ids) == 16 for ids in replies["changed"])
    assert not all(printable(ids) for ids in replies["original"])


def test_the_table_has_a_row_per_cell_both_servers_ran_with_the_ratios():
    def cell(ttft_s: float, rate: float, rounds: int) -> dict:
        return {
            "time_to_first_token": {"p50": ttft_s * 1000, "p99": ttft_s * 1100}, "inter_token_latency": {"p50": 90.0, "p99": 120.0},
            "output_token_throughput": {"avg": rate}, "request_throughput": {"avg": rate / 32}, "rounds": rounds,
        }  # fmt: skip

    medians = {"float32": {
        "ours": {"1280x720-c1": cell(60.0, 0.5, 2), "448x448-c4": cell(20.0, 3.0, 1), "448x448-c1": cell(6.0, 3.0, 2)},
        "llama-server": {"1280x720-c1": cell(80.0, 0.4, 2), "448x448-c1": cell(8.0, 2.0, 2)},
    }}  # fmt: skip
    rows = [line for line in table(medians).splitlines() if line.startswith("| 4") or line.startswith("| 1")]
    assert [row.split(" | ")[:2] for row in rows] == [["| 448×448", "1"], ["| 1280×720", "1"]]  # c4: llama-server never ran it
    assert rows[0].endswith("| 6.00 / 8.00 | 6.60 / 8.80 | 90 / 90 | 120 / 120 | 3.000 / 2.000 | 0.0938 / 0.0625 | 0.75x | 1.50x |")
    assert "| 2/2 |" in rows[1] and rows[1].endswith("| 0.75x | 1.25x |")


def test_make_bench_is_compared_with_aiperf_of_the_same_session(tmp_path):
    run = tmp_path / "float32" / "ours" / "round1"
    (run / "448x448-make-bench").mkdir(parents=True)
    level = {"median_ttft_ms": 7700.0, "median_itl_ms": 90.0, "output_throughput": 3.0}
    (run / "448x448-make-bench" / "bench.json").write_text(json.dumps({"levels": [level]}))
    (run / "1280x720-make-bench").mkdir()  # its AIPerf run never finished: no row
    (run / "1280x720-make-bench" / "bench.json").write_text(json.dumps({"levels": [level]}))
    (run / "448x448-c1").mkdir()
    export = {"time_to_first_token": {"p50": 7000.0, "p99": 1.0}, "inter_token_latency": {"p50": 100.0, "p99": 1.0}, "output_token_throughput": {"avg": 3.0}}
    (run / "448x448-c1" / "profile_export_aiperf.json").write_text(json.dumps(export))
    rows = agreement(tmp_path).splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith("| float32 | 1 | 448×448 |")
    assert rows[0].endswith("| 7.70 / 7.00 | 90 / 100 | 3.000 / 3.000 | +10.0%, -10.0%, +0.0% |")


def test_make_bench_against_aiperf_over_rounds_is_the_median_of_the_pairs(tmp_path):
    for round_name, (bench_ttft, aiperf_ttft) in {"round0": (8000.0, 7000.0), "round1": (6000.0, 7400.0), "round2": (7100.0, 6600.0)}.items():
        run = tmp_path / "int8" / "ours" / round_name
        (run / "448x448-make-bench").mkdir(parents=True)
        level = {"median_ttft_ms": bench_ttft, "median_itl_ms": 50.0, "output_throughput": 4.0}
        (run / "448x448-make-bench" / "bench.json").write_text(json.dumps({"levels": [level]}))
        (run / "448x448-c1").mkdir()
        export = {"time_to_first_token": {"p50": aiperf_ttft, "p99": 1.0}, "inter_token_latency": {"p50": 40.0, "p99": 1.0}, "output_token_throughput": {"avg": 5.0}}
        (run / "448x448-c1" / "profile_export_aiperf.json").write_text(json.dumps(export))
    rows = agreement(tmp_path).splitlines()[2:]
    assert [row.split(" | ")[1] for row in rows] == ["0", "1", "2", "median of 3"]
    assert rows[-1].endswith("| 7.10 / 7.00 | 50 / 40 | 4.000 / 5.000 | +1.4%, +25.0%, -20.0% |")


def test_make_bench_goes_first_for_alternate_sizes_and_rounds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(peers_requests, "bench_client", lambda triton, paths, args, folder: calls.append(folder.name))
    monkeypatch.setattr(peers_requests, "run_aiperf", lambda command, out: calls.append(out.name))
    monkeypatch.setattr(peers_requests, "counters", lambda triton, folder: contextlib.nullcontext())
    args = argparse.Namespace(concurrency=[1], requests=2, warmup=0)
    setup = {"aiperf": Path("aiperf"), "checkpoint": tmp_path, "system": tmp_path / "s.txt"}
    images = {size: [tmp_path / "a.jpg"] for size in peers_requests.IMAGE_SIZES}
    orders = []
    for round_index in (0, 1):
        calls.clear()
        peers_requests.profile(setup, "ours", "http://x", "m", object(), images, args, tmp_path / f"round{round_index}", round_index)
        orders.append([name.endswith("make-bench") for name in calls[::2]])
    assert orders == [[True, False, True], [False, True, False]]


def test_where_our_time_went_has_a_row_per_counted_run(tmp_path):
    spent = {"window_s": 100.0, "preprocess_s": 0.2, "vision_encoder_s": 60.0, "vision_tiles": 56, "llm_prefill_s": 30.0,
             "llm_decode_s": 50.5, "llm_steps_by_batch_size": {"1": 10, "8": 30}}  # fmt: skip
    for size in ("1280x720-c8", "448x448-c4", "448x448-c1", "448x448-make-bench"):
        (tmp_path / "int8" / "ours" / "round0" / size).mkdir(parents=True)
        (tmp_path / "int8" / "ours" / "round0" / size / "triton_metrics.json").write_text(json.dumps(spent))
    (tmp_path / "int8" / "ours" / "round0" / "1280x720-c1").mkdir()  # kept from before the counters: no row
    rows = time_spent(tmp_path).splitlines()[2:]
    assert [r.split(" | ")[2:4] for r in rows] == [["448×448", "1 (make bench)"], ["448×448", "1"], ["448×448", "4"], ["1280×720", "8"]]
    assert rows[0].endswith("| 100.0 | 60.0 (60%) | 56 | 30.0 | 50.5 | 6.25 | — |")  # (10 × 1 + 30 × 8) / 40 sequences per step
    (tmp_path / "int8" / "ours" / "round0" / "448x448-c1" / "triton_metrics.json").write_text(json.dumps({**spent, "client_cpu_s": 12.34}))
    assert time_spent(tmp_path).splitlines()[3].endswith("| 6.25 | 12.3 |")


def test_the_counters_take_the_load_generators_cpu_time(tmp_path, monkeypatch):
    monkeypatch.setattr(peers_requests.triton_metrics, "read", lambda url: {})
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    with peers_requests.counters(argparse.Namespace(metrics_url="http://x/metrics"), tmp_path):
        subprocess.run([sys.executable, "-c", burn], check=True)
    spent = json.loads((tmp_path / "triton_metrics.json").read_text())
    assert 0.5 <= spent["client_cpu_s"] < 5 and spent["vision_encoder_s"] == 0
