"""mpirun's remote-launch agent inside Kubernetes: run a command in another pod of this namespace.

    internvl-kube-exec HOST COMMAND...     (installed by pyproject.toml; mpirun -mca plm_rsh_agent)

For tensor parallelism across nodes (build/manifests.py --nodes N, a LeaderWorkerSet), the leader's
`mpirun` starts the ranks of the other nodes through an "rsh agent" instead of ssh, as NVIDIA's
triton-inference-server/tutorials Deployment/Kubernetes/TensorRT-LLM_Multi-Node_Distributed_Models
does with its kubessh (kubectl exec) script: OpenMPI calls the agent with the host and the daemon's
command line, and the daemon then connects back to mpirun over TCP. HOST is the pod's DNS name; its
first label is the pod name. This runs the command through the Kubernetes API's pod exec (the pod's
service account needs `create` on `pods/exec`: the generated Role grants it), prints what it writes
and exits with its exit code.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def pod_name(host: str) -> str:
    return host.split(".", 1)[0]


def exec_in_pod(host: str, command: list[str], namespace: str) -> int:
    from kubernetes import client, config
    from kubernetes.stream import stream

    config.load_incluster_config()
    api = client.CoreV1Api()
    ws = stream(
        api.connect_get_namespaced_pod_exec,
        pod_name(host),
        namespace,
        command=["/bin/sh", "-c", shlex.join(command)],
        stdout=True,
        stderr=True,
        stdin=False,
        tty=False,
        _preload_content=False,
    )
    while ws.is_open():
        ws.update(timeout=1)
        if ws.peek_stdout():
            sys.stdout.write(ws.read_stdout())
            sys.stdout.flush()
        if ws.peek_stderr():
            sys.stderr.write(ws.read_stderr())
            sys.stderr.flush()
    ws.close()
    return ws.returncode or 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="internvl-kube-exec", description=__doc__.split("\n")[0])
    parser.add_argument("host", help="the pod's DNS name (its first label is the pod name)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run there")
    args = parser.parse_args()
    if not args.command:
        parser.error("no command")
    namespace = NAMESPACE_FILE.read_text(encoding="utf-8").strip() if NAMESPACE_FILE.is_file() else "default"
    sys.exit(exec_in_pod(args.host, args.command, namespace))


if __name__ == "__main__":
    main()
