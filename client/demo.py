"""`make demo`: the whole serving path on a fresh machine, end to end.

Generates the tiny checkpoint (cached), builds the Triton model repository, starts tritonserver,
streams a reply to the shipped sample image over gRPC, prints it with its timing, stops the server.
The checkpoint has seeded random weights with real InternVL shapes: the reply is meaningless text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from build.checkpoint import generate
from build.repository import build
from client.triton_client import InternVLClient
from launcher.server import TritonServer, free_port

SAMPLE = Path(__file__).with_name("samples") / "lake_house.jpg"



def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m client.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/checkpoints/tiny-qwen3"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/build"))
    parser.add_argument("--image", type=Path, default=SAMPLE)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("question", nargs="?", default="Describe the image in detail.")
    args = parser.parse_args()

    print(f"checkpoint: {generate('tiny', 'qwen3', args.checkpoint)} (random weights: the reply is meaningless)")
    build(args.checkpoint, args.out)
    ports = [free_port() for _ in range(3)]
    print(f"starting tritonserver (HTTP {ports[0]}, gRPC {ports[1]}, metrics {ports[2]}) ...", flush=True)
    started = time.perf_counter()
    with TritonServer(args.out, *ports, log_file=args.out / "tritonserver.log") as server:
        print(f"ready in {time.perf_counter() - started:.1f} s; log: {args.out / 'tritonserver.log'}")
        client = InternVLClient(server.grpc_url)
        print(f"\nUser: <image {args.image.name}>\n{args.question}\nAssistant: ", end="", flush=True)
        start, first, tokens = time.perf_counter(), None, 0
        for delta in client.stream(args.question, [args.image.read_bytes()], keep_empty=True, max_tokens=args.max_tokens):
            tokens += 1  # one streamed response per generated token
            first = first or time.perf_counter()
            sys.stdout.write(delta)
            sys.stdout.flush()
        end = time.perf_counter()
    decode = (tokens - 1) / (end - first) if tokens > 1 else float("nan")
    print(
        f"\n\n[tritonserver, CPU, gRPC streaming] time to first token {first - start:.2f} s, "
        f"{tokens} tokens in {end - start:.2f} s, decode {decode:.1f} tokens/s"
    )


if __name__ == "__main__":
    main()
