"""Start tritonserver on a GPU build (`make build TARGET=gpu`), one process per TensorRT-LLM rank.

    python -m launcher.gpu --out <build dir> [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
        [--openai-port 9000] [--tritonserver /opt/tritonserver/bin/tritonserver] [--print-only]

World size = tp_size × pp_size of the build. With 1 rank it runs tritonserver; with more it runs
one MPMD `mpirun` in TensorRT-LLM's leader mode, as TensorRT-LLM's
triton_backend/scripts/launch_triton_server.py does: rank 0 serves the whole repository, ranks ≥ 1
load only the tensorrt_llm model (explicit model control) and never return from its
initialization; every rank gets its own python-backend shared-memory prefix. Ranks find their GPU
through the tensorrt_llm model's gpu_device_ids (build flag --llm-gpus).

Across nodes (`--hosts`, or `--lws` inside a LeaderWorkerSet, whose leader and worker pods are
`<name>-<group>` and `<name>-<group>-<i>` under the LeaderWorkerSet's headless service): ranks are
placed on the hosts in order, ranks_per_node slots each (`mpirun --host h:slots,...`), and mpirun
reaches the other pods through `--rsh-agent` (`internvl-kube-exec`, launcher/kube_exec.py) — the
form of NVIDIA's multi-node TensorRT-LLM Kubernetes tutorial. Every pod mounts the same build.

With --openai-port the OpenAI-compatible server runs beside it (launcher/supervise.py), as
`make serve` does on CPU; without, the server command replaces this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from build.settings import HelpFormatter
from launcher.openai_process import OpenAIProcess
from launcher.server import LaunchError, check_ports, server_environment
from launcher.supervise import serve_with_openai

TRITONSERVER = "/opt/tritonserver/bin/tritonserver"  # in the NGC tritonserver containers


def world_size(out: Path) -> int:
    build_file = Path(out) / "build.json"
    build = json.loads(build_file.read_text(encoding="utf-8")) if build_file.is_file() else {}
    if build.get("target") != "gpu":
        raise ValueError(f"{out} holds no GPU build: run `make build TARGET=gpu OUT={out}` (a CPU build serves with `make serve`)")
    return int(build["values"]["tp_size"]) * int(build["values"]["pp_size"])


def lws_hosts(env: dict[str, str]) -> list[str]:
    """The pods of this LeaderWorkerSet group, leader first, from the variables LWS injects
    (LWS_LEADER_ADDRESS = <name>-<group>.<service>.<namespace>, LWS_GROUP_SIZE)."""
    try:
        leader, size = env["LWS_LEADER_ADDRESS"], int(env["LWS_GROUP_SIZE"])
    except (KeyError, ValueError) as error:
        raise ValueError(f"--lws needs LWS_LEADER_ADDRESS and LWS_GROUP_SIZE (set by the LeaderWorkerSet): {error}") from None
    pod, _, domain = leader.partition(".")
    return [leader] + [f"{pod}-{i}.{domain}" if domain else f"{pod}-{i}" for i in range(1, size)]


def server_command(
    out: Path,
    ranks: int,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    tritonserver: str = TRITONSERVER,
    hosts: list[str] | None = None,
    rsh_agent: str | None = None,
) -> list[str]:
    """hosts: the nodes, leader first; the ranks fill them in order, ranks / len(hosts) each."""
    repository = Path(out).resolve() / "model_repository"
    ports = [f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}"]
    if ranks == 1 and not hosts:
        return [tritonserver, f"--model-repository={repository}", *ports]
    command = ["mpirun", "--allow-run-as-root"]
    if hosts:
        if ranks % len(hosts):
            raise ValueError(f"{ranks} ranks do not split evenly over {len(hosts)} hosts")
        command += ["--host", ",".join(f"{h}:{ranks // len(hosts)}" for h in hosts)]
        if rsh_agent:
            command += ["--mca", "plm_rsh_agent", rsh_agent]
    for rank in range(ranks):
        command += ["-n", "1", tritonserver, f"--model-repository={repository}", *ports]
        if rank > 0:
            command += ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
        command += ["--disable-auto-complete-config", f"--backend-config=python,shm-region-prefix-name=prefix{rank}_", ":"]
    return command[:-1]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m launcher.gpu", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="build directory (make build TARGET=gpu OUT=...)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP endpoint (KServe v2, generate)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC endpoint (KServe v2, streaming)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics")
    parser.add_argument("--openai-port", type=int, default=0, help="also serve the OpenAI-compatible API (python -m openai_api) on this port; 0 = no")
    parser.add_argument("--openai-address", default="127.0.0.1", help="address the OpenAI-compatible API listens on (it has no API key unless INTERNVL_API_KEY is set)")
    parser.add_argument("--tritonserver", default=TRITONSERVER, help="the server binary (the container's)")
    parser.add_argument("--hosts", type=lambda s: [h for h in s.split(",") if h], help="nodes of a multi-node build, leader (this one) first (default: this node only)")
    parser.add_argument("--lws", action="store_true", help="the nodes are this LeaderWorkerSet group's pods (LWS_* variables)")
    parser.add_argument("--rsh-agent", help="how mpirun starts ranks on the other nodes, e.g. internvl-kube-exec (default: ssh)")
    parser.add_argument("--print-only", action="store_true", help="print the command instead of running it")
    args = parser.parse_args()
    try:
        hosts = lws_hosts(dict(os.environ)) if args.lws else args.hosts
        command = server_command(
            args.out, world_size(args.out), args.http_port, args.grpc_port, args.metrics_port, args.tritonserver, hosts, args.rsh_agent
        )
        if not args.print_only:  # tritonserver finds a taken port only after loading the engines
            ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
            check_ports("0.0.0.0", {**ports, **({"--openai-port": args.openai_port} if args.openai_port else {})})
    except (ValueError, LaunchError) as error:
        parser.exit(2, f"error: {error}\n")
    if args.print_only:
        print(" ".join(command))
        return
    env = server_environment()
    if args.openai_port:
        openai = OpenAIProcess(f"127.0.0.1:{args.grpc_port}", args.openai_address, args.openai_port)
        sys.exit(serve_with_openai(command, env, args.http_port, openai))
    os.execvpe(command[0], command, env)  # the server (or mpirun) replaces this process


if __name__ == "__main__":
    main()
