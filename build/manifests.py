"""Kubernetes manifests for one model, from the same settings as its model repository.

    python -m build.manifests --model DIR --out DIR [--target cpu|gpu] [--image IMAGE] [build flags]

Writes OUT/k8s/: a Deployment running Triton in the image of Dockerfile.<target> (its start command
builds the repository with these same build flags, passed as BUILD_ARGS, then serves), with GPU
requests equal to the GPUs the build places models on, startup / readiness / liveness probes on
Triton's /v2/health/ready and /v2/health/live, Prometheus scrape annotations on the metrics port and a
memory-backed /dev/shm for the python backend; a Service for the HTTP, gRPC and metrics ports; and a
HorizontalPodAutoscaler on Triton's per-pod pending-request gauge (nv_inference_pending_request_count,
which needs a custom-metrics adapter such as prometheus-adapter; docs/DEPLOY.md). The checkpoint comes
from a PersistentVolumeClaim; the build goes to an emptyDir unless --build-claim names a claim (GPU
engines then survive restarts). The OpenAI-compatible front is a Deployment and Service of its own
(build/manifests_openai.py). Triton's pods use no Kubernetes API and mount no service account token.

With --nodes N (GPU target), the TensorRT-LLM ranks span N nodes: a LeaderWorkerSet of N pods per
replica instead of the Deployment, each with exec rights into its own pods only
(build/manifests_multinode.py).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import yaml

from build.gpu_memory import llm_gpu_ids
from build.manifests_multinode import check_nodes, leader_worker_groups
from build.manifests_openai import OPENAI_PORT, openai_front  # noqa: F401 (OPENAI_PORT: the images EXPOSE it too)
from build.repository import check_gpu_build, refuse_gpu_flags
from build.settings import BuildSettings, GpuSettings, HelpFormatter, add_arguments, from_arguments
from engine.config import ModelConfig

PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Dockerfile.cpu / Dockerfile.gpu EXPOSE and start command
MODEL_MOUNT, BUILD_MOUNT = "/models/checkpoint", "/var/lib/internvl-serve/build"  # the images' MODEL and OUT
# the first start builds the repository (GPU: TensorRT and TensorRT-LLM engines, tens of minutes)
STARTUP_SECONDS = {"cpu": 20 * 60, "gpu": 2 * 60 * 60}
PENDING_METRIC = "nv_inference_pending_request_count"  # Triton's per-model gauge of queued requests


def build_flags(settings: BuildSettings, gpu: GpuSettings, target: str) -> list[str]:
    """The build.repository flags that reproduce these settings: those that differ from the defaults,
    and on the GPU the placement always (--vision-gpus 0 is the default, but a reader of the manifest
    should not have to know it)."""
    flags = ["--target", target] if target == "gpu" else []
    chosen = [settings] + ([gpu] if target == "gpu" else [])
    always = {"vision_gpus", "llm_gpus"}
    for values in chosen:
        defaults = type(values)()
        for f in fields(values):
            value = getattr(values, f.name)
            if value == getattr(defaults, f.name) and not (f.name in always and value):
                continue
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value).lower() if isinstance(value, bool) else str(value)
            flags += [f"--{f.name.replace('_', '-')}", text]
    return flags


def gpu_count(gpu: GpuSettings) -> int:
    """GPUs one replica uses: the vision plan's and the LLM ranks' (build flags --vision-gpus, --llm-gpus)."""
    return len(set(gpu.vision_gpus) | set(llm_gpu_ids(gpu)))


def triton(name: str, image: str, target: str, settings: BuildSettings, gpu: GpuSettings, args: argparse.Namespace) -> dict[str, dict]:
    """-> {file stem: object}: Triton's Deployment, Service and autoscaler, all named <name>."""
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "triton"}
    probe = lambda path, **extra: {"httpGet": {"path": path, "port": "http"}, "periodSeconds": 10, **extra}  # noqa: E731
    resources = {"requests": {"cpu": args.cpu, "memory": args.memory}, "limits": {"memory": args.memory}}
    if target == "gpu":
        resources["limits"]["nvidia.com/gpu"] = gpu_count(gpu)
    build_volume = {"persistentVolumeClaim": {"claimName": args.build_claim}} if args.build_claim else {"emptyDir": {}}
    container = {
        "name": "triton",
        "image": image,
        "env": [
            {"name": "MODEL", "value": MODEL_MOUNT},
            {"name": "OUT", "value": BUILD_MOUNT},
            {"name": "BUILD_ARGS", "value": " ".join(build_flags(settings, gpu, target))},
        ],
        "ports": [{"name": n, "containerPort": p} for n, p in PORTS.items()],
        "startupProbe": probe("/v2/health/ready", failureThreshold=STARTUP_SECONDS[target] // 10),
        "readinessProbe": probe("/v2/health/ready", failureThreshold=3),
        "livenessProbe": probe("/v2/health/live", failureThreshold=6),
        "resources": resources,
        "volumeMounts": [
            {"name": "checkpoint", "mountPath": MODEL_MOUNT, "readOnly": True},
            {"name": "build", "mountPath": BUILD_MOUNT},
            {"name": "shm", "mountPath": "/dev/shm"},  # python-backend tensors cross processes here
        ],
    }
    pod = {
        "metadata": {
            "labels": labels,
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"]), "prometheus.io/path": "/metrics"},
        },
        "spec": {
            "terminationGracePeriodSeconds": 60,  # launcher.server lets in-flight requests finish on SIGTERM
            "automountServiceAccountToken": False,
            "containers": [container],
            "volumes": [
                {"name": "checkpoint", "persistentVolumeClaim": {"claimName": args.model_claim, "readOnly": True}},
                {"name": "build", **build_volume},
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": args.shm}},
            ],
        },
    }
    meta = {"name": name, "labels": labels}
    return {
        "deployment": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {"replicas": args.replicas, "selector": {"matchLabels": labels}, "template": pod},
        },
        "service": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "selector": labels,
                "ports": [{"name": n, "port": p, "targetPort": n} for n, p in PORTS.items()],
            },
        },
        "hpa": {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta,
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": args.replicas,
                "maxReplicas": max(args.replicas, args.max_replicas),
                "metrics": [
                    {
                        "type": "Pods",
                        "pods": {
                            "metric": {"name": PENDING_METRIC},
                            "target": {"type": "AverageValue", "averageValue": str(args.pending_per_replica)},
                        },
                    }
                ],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # repeated label maps written out, not as &anchors
        return True


def write_manifests(out: Path, objects: dict[str, dict]) -> list[Path]:
    """OUT/k8s/<kind>.yaml for each object; YAML files of an earlier layout are removed, so that
    `kubectl apply -f OUT/k8s` applies exactly this deployment."""
    directory = Path(out) / "k8s"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in set(directory.glob("*.yaml")) - {directory / f"{kind}.yaml" for kind in objects}:
        stale.unlink()
    written = []
    for kind, obj in objects.items():
        path = directory / f"{kind}.yaml"
        path.write_text(yaml.dump(obj, Dumper=_Dumper, sort_keys=False), encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m build.manifests", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory (checked here; the pods mount it from --model-claim)")
    parser.add_argument("--out", type=Path, required=True, help="the manifests go to OUT/k8s/")
    parser.add_argument("--target", choices=("cpu", "gpu"), default="cpu", help="which image and build")
    parser.add_argument("--name", default="internvl", help="name of Triton's Deployment, Service and autoscaler; the OpenAI front's are <name>-openai")
    parser.add_argument("--image", help="container image (default internvl-serve:<target>, built from Dockerfile.<target>)")
    parser.add_argument("--replicas", type=int, default=1, help="Triton replicas (with --nodes: groups), and the autoscaler's minimum")
    parser.add_argument("--max-replicas", type=int, default=4, help="the autoscaler's maximum (single-node only)")
    parser.add_argument("--pending-per-replica", type=int, default=8, help="autoscaler target: queued requests per replica (single-node only)")
    parser.add_argument("--openai-replicas", type=int, default=1, help="replicas of the OpenAI-compatible front")
    parser.add_argument("--api-key-secret", help="Secret whose key api-key the OpenAI front requires of clients (default: none, it serves anyone)")
    parser.add_argument("--model-claim", default="internvl-checkpoint", help="PersistentVolumeClaim holding the checkpoint")
    parser.add_argument("--build-claim", help="PersistentVolumeClaim for the build (default: an emptyDir, rebuilt at each start)")
    parser.add_argument("--cpu", default="2", help="CPU request per replica")
    parser.add_argument("--memory", default="16Gi", help="memory request and limit per replica")
    parser.add_argument("--shm", default="2Gi", help="size of /dev/shm")
    parser.add_argument("--nodes", type=int, default=1, help="GPU target: nodes the TensorRT-LLM ranks span (a LeaderWorkerSet per replica)")
    add_arguments(parser, BuildSettings, title="limits and instances (both targets)")
    add_arguments(parser, GpuSettings, title="GPU target only (--target gpu)")
    args = parser.parse_args()
    values = vars(args).copy()
    try:
        gpu, settings = from_arguments(GpuSettings, values), from_arguments(BuildSettings, values)
        if not Path(args.model).is_dir():
            raise ValueError(
                f"--model {args.model}: no such directory on this machine; the manifests are written from the checkpoint "
                "here (its config.json checks the settings): copy or mount it here (the pods read theirs from --model-claim)"
            )
        config = ModelConfig.from_pretrained(args.model)
        settings.limits(config)  # the checkpoint and the limits agree
        if args.target == "gpu":
            check_gpu_build(config, gpu)
            check_nodes(gpu, args.nodes, args.build_claim)
            autoscaler = [f"--{k.replace('_', '-')}" for k in ("max_replicas", "pending_per_replica") if getattr(args, k) != parser.get_default(k)]
            if args.nodes > 1 and autoscaler:
                raise ValueError(f"{', '.join(autoscaler)}: a multi-node deployment has no autoscaler, --replicas sets its groups (docs/DEPLOY.md)")
        else:
            refuse_gpu_flags(gpu)
            if args.nodes != 1:
                raise ValueError("--nodes needs --target gpu")
        if min(args.replicas, args.max_replicas, args.openai_replicas) < 1:
            raise ValueError("--replicas, --max-replicas and --openai-replicas must be ≥ 1")
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    image = args.image or f"internvl-serve:{args.target}"
    objects = triton(args.name, image, args.target, settings, gpu, args)
    if args.nodes > 1:
        objects = leader_worker_groups(objects, gpu, args.nodes)
    objects |= openai_front(args.name, image, f"{args.name}:{PORTS['grpc']}", args.openai_replicas, args.api_key_secret)  # Triton's Service
    for path in write_manifests(args.out, objects):
        print(path)


if __name__ == "__main__":
    main()
