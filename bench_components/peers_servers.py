"""The two servers of the whole-request comparison, each as a context manager yielding its base URL:
ours (tritonserver with the build of the checkpoint, the OpenAI server in front) and llama.cpp's
llama-server on the GGUFs converted from the same checkpoint. One at a time, on the same cores with
the same thread count.

llama-server flags (common/arg.cpp of the vendored llama.cpp): -t / -tb threads for decode / prompt;
-np slots (one per concurrent request, as our in-flight batch); -kvu one KV buffer the slots share
(else each slot gets ctx / slots); -c that buffer's tokens; continuous batching is its default; no
prompt cache across requests (-cram 0, --no-cache-prompt: ours reuses prefixes too, but the benchmark
sends one image per request anyway).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench_components.common import log
from launcher.server import TritonServer, free_port

STARTUP_TIMEOUT = 600.0  # seconds: our first start builds nothing, but loads ONNX and the LLM


def build_ours(checkpoint: Path, build_dir: Path, llm_weights: str, vision_precision: str, slots: int) -> Path:
    """Our Triton repository for the checkpoint, `slots` sequences in flight. Built on every start:
    the models' code is copied from this tree each time (the vision ONNX is kept while up to date), so
    a benchmark never measures a repository left from older code."""
    from build.repository import build
    from build.settings import BuildSettings

    log(f"peers: building our repository (llm_weights {llm_weights}, vision_precision {vision_precision}) -> {build_dir}")
    # no vision-feature cache and no prefix reuse: llama-server runs without its prompt cache too
    settings = BuildSettings(
        llm_weights=llm_weights, vision_precision=vision_precision, llm_max_batch_size=slots, max_images=1, vision_cache_mib=0, prefix_cache_mib=0
    )
    build(checkpoint, build_dir, settings)
    return build_dir


@contextlib.contextmanager
def serve_ours(checkpoint: Path, build_dir: Path, llm_weights: str, vision_precision: str, slots: int) -> Iterator[tuple[str, str, TritonServer]]:
    """-> (base URL of our OpenAI server, its model name, the tritonserver behind it)."""
    from openai_api.server import running_server
    from openai_api.settings import Settings

    build_ours(checkpoint, build_dir, llm_weights, vision_precision, slots)
    with TritonServer(build_dir, free_port(), free_port(), free_port(), log_file=build_dir / "tritonserver.log") as server:
        with running_server(Settings(triton_url=server.grpc_url, port=0), startup_timeout=60) as url:
            yield url, checkpoint.name, server


def llama_server_command(binary: Path, text: Path, mmproj: Path, threads: int, slots: int, context: int, port: int) -> list[str]:
    return [
        str(binary), "-m", str(text), "--mmproj", str(mmproj), "-t", str(threads), "-tb", str(threads),
        "-np", str(slots), "-kvu", "-c", str(context), "--no-cache-prompt", "-cram", "0",
        "--host", "127.0.0.1", "--port", str(port), "--no-webui",
    ]  # fmt: skip


@contextlib.contextmanager
def serve_llama(command: list[str], port: int, log_file: Path) -> Iterator[tuple[str, str, None]]:
    """-> (llama-server's base URL once /health answers 200 (the model and mmproj loaded), the model
    name sent to it, None: no Triton behind it), as serve_ours yields."""
    url = f"http://127.0.0.1:{port}"
    with open(log_file, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, process, log_file)
            yield url, "llama-server", None
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"llama-server exited with {process.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"llama-server at {url} not healthy after {STARTUP_TIMEOUT:.0f} s (log: {log_file})")


def chat(url: str, model: str, body: dict, timeout: float = 600) -> dict:
    """One non-streamed /v1/chat/completions request -> the JSON reply."""
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps({"model": model, **body}).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())
