"""Triton across nodes (build/manifests.py --nodes N, GPU target): the single-node Deployment turned into
LeaderWorkerSets (the leaderworkerset.x-k8s.io/v1 API) whose groups hold N pods each.

The leader builds into the shared --build-claim (ReadWriteMany) and starts every rank with `launcher.gpu
--lws --rsh-agent internvl-kube-exec`; the workers mount the same build and wait. mpirun starts the
workers' ranks through the Kubernetes API's pod exec (launcher/kube_exec.py), so the leader's
ServiceAccount needs pods/exec. RBAC tells callers apart only by their account, and all groups of one
LeaderWorkerSet share one leader template, hence one account: a Role there could only list every group's
pods. So each replica is its own LeaderWorkerSet of one group, with its own ServiceAccount, Role and
RoleBinding, and the Role names exactly that group's pods. Its price: no autoscaler (it could add groups
only inside one LeaderWorkerSet, without exec rights); --replicas sets the number of groups.
"""

from __future__ import annotations

from build.settings import GpuSettings

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"  # label LeaderWorkerSet puts on its pods
# the leader's start: Dockerfile.gpu's command, with the ranks spread over the group's pods
LEADER_COMMAND = (
    'python3 -m build.repository --model "$MODEL" --out "$OUT" --target gpu $BUILD_ARGS && exec python3 -m launcher.gpu '
    '--out "$OUT" --lws --rsh-agent internvl-kube-exec --http-port 8000 --grpc-port 8001 --metrics-port 8002'
)


def check_nodes(gpu: GpuSettings, nodes: int, build_claim: str | None) -> int:
    """-> ranks per node; refuses what a multi-node group cannot place."""
    if nodes < 1 or gpu.world_size % nodes:
        raise ValueError(f"--nodes {nodes} must divide tp_size × pp_size = {gpu.world_size}")
    if nodes > 1 and gpu.llm_gpus:
        raise ValueError("--llm-gpus places ranks on one node; with --nodes each node's ranks use its GPUs in order")
    if nodes > 1 and not build_claim:
        raise ValueError("--nodes needs --build-claim: a ReadWriteMany claim every node of the group mounts (the leader builds into it)")
    return gpu.world_size // nodes


def group_pods(lws_name: str, size: int) -> list[str]:
    """The pods of a LeaderWorkerSet's one group (index 0), leader first. With the default (Ordinal) group
    identity LWS names the leader <lws>-<group> and the workers <lws>-<group>-<1..size-1> (kubernetes-sigs/lws
    site/content/en/docs/concepts/_index.md; pkg/controllers/pod_controller.go names the worker StatefulSet
    after its leader pod)."""
    return [f"{lws_name}-0", *(f"{lws_name}-0-{index}" for index in range(1, size))]


def exec_rights(meta: dict, pods: list[str]) -> dict[str, dict]:
    """A ServiceAccount allowed to exec into these pods only (the leader among them, in case mpirun treats
    its own host as remote: no right the leader lacks)."""
    rbac = "rbac.authorization.k8s.io"
    # kube_exec's one API call is a pod exec over a WebSocket: a GET, authorised as `get` on pods/exec, and
    # since Kubernetes 1.35 as `create` too (AuthorizePodWebsocketUpgradeCreatePermission, kubernetes/kubernetes#134577)
    rule = {"apiGroups": [""], "resources": ["pods/exec"], "resourceNames": pods, "verbs": ["create", "get"]}
    return {
        "serviceaccount": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        "role": {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": meta, "rules": [rule]},
        "rolebinding": {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": meta["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": meta["name"]}],
        },
    }


def leader_worker_groups(objects: dict[str, dict], gpu: GpuSettings, nodes: int) -> dict[str, dict]:
    """The single-node Triton objects (deployment, service, hpa) -> a LeaderWorkerSet of one group per
    replica with its exec rights, and the Service on the leaders."""
    deployment = objects.pop("deployment")
    objects.pop("hpa")
    name, labels = deployment["metadata"]["name"], deployment["metadata"]["labels"]
    per_node = gpu.world_size // nodes
    leader = deployment["spec"]["template"]
    container = leader["spec"]["containers"][0]
    container.update(command=["bash", "-c", LEADER_COMMAND])
    container["resources"]["limits"]["nvidia.com/gpu"] = len(set(gpu.vision_gpus) | set(range(per_node)))
    worker_container = {k: v for k, v in container.items() if k not in ("startupProbe", "readinessProbe", "livenessProbe", "ports")}
    worker_container.update(command=["sleep", "infinity"], resources={**container["resources"], "limits": {**container["resources"]["limits"], "nvidia.com/gpu": per_node}})
    worker = {"metadata": {"labels": labels}, "spec": {**leader["spec"], "containers": [worker_container]}}
    objects["service"]["spec"]["selector"] = {**labels, LWS_WORKER_INDEX: "0"}
    groups = {}
    for index in range(deployment["spec"]["replicas"]):
        meta = {"name": f"{name}-group{index}", "labels": labels}  # not <name>: LWS's headless Service takes the LWS's name
        groups[f"group{index}-leaderworkerset"] = {
            "apiVersion": LWS_API,
            "kind": "LeaderWorkerSet",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "leaderWorkerTemplate": {
                    "size": nodes,
                    "restartPolicy": "RecreateGroupOnPodRestart",  # a lost rank ends the whole mpirun job
                    "leaderTemplate": {**leader, "spec": {**leader["spec"], "serviceAccountName": meta["name"], "automountServiceAccountToken": True}},
                    "workerTemplate": worker,
                },
            },
        }
        groups |= {f"group{index}-{kind}": obj for kind, obj in exec_rights(meta, group_pods(meta["name"], nodes)).items()}
    return {**groups, **objects}
