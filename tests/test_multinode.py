"""Tensor parallelism across nodes on Kubernetes (issue 12, item 8): `build.manifests --nodes N` writes a
LeaderWorkerSet group per replica whose leader starts every rank with one mpirun (`launcher.gpu --lws
--rsh-agent internvl-kube-exec`), the pattern of NVIDIA's multi-node TensorRT-LLM Kubernetes tutorial
(triton-inference-server/tutorials Deployment/Kubernetes/TensorRT-LLM_Multi-Node_Distributed_Models:
`mpirun -mca plm_rsh_agent kubessh ... --host <pods>`). Nothing here ran on a cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import yaml

from build.manifests_multinode import LWS_WORKER_INDEX
from tests.doc_commands import module_invocations, parse_exactly
from tests.manifest_access import account, exec_rules, exec_targets, mounts_token, pod_templates
from tests.test_deploy_images import IMAGES, _one
from launcher import kube_exec
from launcher.gpu import lws_hosts, server_command

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")
# kubernetes-sigs/lws api/leaderworkerset/v1/leaderworkerset_types.go: LeaderWorkerSetSpec, LeaderWorkerTemplate
LWS_SPEC_FIELDS = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE_FIELDS = {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy", "volumeClaimTemplates"}
LWS_RESTART_POLICIES = {"RecreateGroupOnPodRestart", "None"}


@pytest.fixture(scope="module")
def group(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    flags = ["--tp-size", "4", "--nodes", "2", "--build-claim", "shared-build", "--replicas", "2"]
    result = subprocess.run([sys.executable, "-m", "build.manifests", "--model", str(tiny), "--out", str(out), "--target", "gpu", *flags], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return out, {p.stem: yaml.safe_load(p.read_text()) for p in (out / "k8s").glob("*.yaml")}


def leaderworkersets(objects: dict[str, dict]) -> list[dict]:
    return [o for o in objects.values() if o["kind"] == "LeaderWorkerSet"]


def test_core_objects_validate_strictly_and_the_group_pod_templates_too(group, tmp_path):
    out, objects = group
    assert "deployment" not in objects
    core = [p for p in sorted((out / "k8s").glob("*.yaml")) if objects[p.stem]["kind"] != "LeaderWorkerSet"]
    for lws in leaderworkersets(objects):
        for role in ("leaderTemplate", "workerTemplate"):  # no schema for the CRD: its pod templates as PodTemplates
            name = f"{lws['metadata']['name']}-{role.lower()}"
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": lws["spec"]["leaderWorkerTemplate"][role]}))
            core.append(path)
    result = subprocess.run([str(VALIDATE), "--strict", *map(str, core)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.count("passed") == len(core), result.stdout + result.stderr


def test_the_leaderworkersets_use_only_their_api_fields(group):
    for lws in leaderworkersets(group[1]):
        assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and set(lws["spec"]) <= LWS_SPEC_FIELDS
        template = lws["spec"]["leaderWorkerTemplate"]
        assert set(template) <= LWS_TEMPLATE_FIELDS and template["restartPolicy"] in LWS_RESTART_POLICIES
        assert template["size"] == 2 and lws["spec"]["replicas"] == 1
    assert len(leaderworkersets(group[1])) == 2  # --replicas 2: a LeaderWorkerSet per group (exec rights per group)


def test_gpus_per_pod_and_the_shared_build(group):
    lws = leaderworkersets(group[1])[0]["spec"]["leaderWorkerTemplate"]
    (leader,), (worker,) = lws["leaderTemplate"]["spec"]["containers"], lws["workerTemplate"]["spec"]["containers"]
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == 2  # ranks 0-1 (vision shares GPU 0)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2  # ranks 2-3
    for pod in (lws["leaderTemplate"], lws["workerTemplate"]):
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
        assert claims["build"] == "shared-build"  # every node reads the engines the leader built
    assert "readinessProbe" in leader and "readinessProbe" not in worker and worker["command"] == ["sleep", "infinity"]


def test_the_leader_runs_the_images_build_then_every_rank_through_the_pods(group):
    lws = leaderworkersets(group[1])[0]["spec"]["leaderWorkerTemplate"]
    (leader,) = lws["leaderTemplate"]["spec"]["containers"]
    assert leader["command"][:2] == ["bash", "-c"]
    env = {e["name"]: e["value"] for e in leader["env"]}
    line = leader["command"][2].replace("$BUILD_ARGS", env["BUILD_ARGS"]).replace('"$MODEL"', env["MODEL"]).replace('"$OUT"', env["OUT"])
    (build_module, build_args), (launch_module, launch_args) = module_invocations(line)
    assert (build_module, launch_module) == ("build.repository", "launcher.gpu")
    for module, args in ((build_module, build_args), (launch_module, launch_args)):
        parse_exactly(module, args)
    image = json.loads(_one(IMAGES["gpu"], "CMD"))[2]
    assert leader["command"][2].split(" && ")[0] == image.split(" && ")[0]  # the image's own build
    assert {"--lws", "--rsh-agent"} <= set(launch_args) and "internvl-kube-exec" in launch_args
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["internvl-kube-exec"] == "launcher.kube_exec:main"


def test_each_leader_can_exec_only_into_its_own_groups_pods(group):
    objects = group[1]
    # kube_exec's only call, a pod exec over a WebSocket: `get`, and `create` since Kubernetes 1.35
    assert [sorted(r["verbs"]) for r in exec_rules(objects)] == [["create", "get"]] * 2
    assert [r for o in objects.values() if o["kind"] == "Role" for r in o["rules"] if r["resources"] != ["pods/exec"]] == []
    targets, pods = exec_targets(objects), pod_templates(objects)
    leaders = {key: pod for key, pod in pods.items() if key.endswith("/leader")}
    assert sorted(targets) == sorted(account(pod) for pod in leaders.values()) and len(targets) == 2
    for lws in leaderworkersets(objects):
        name = lws["metadata"]["name"]  # LWS names a group's leader <name>-<group>, its workers <name>-<group>-<index>
        leader = next(pod for key, pod in leaders.items() if objects[key.split("/")[0]] is lws)
        assert targets[account(leader)] == {f"{name}-0", f"{name}-0-1"} and mounts_token(leader, objects)
    for key, pod in pods.items():
        if not key.endswith("/leader"):  # the workers and the OpenAI front
            assert account(pod) not in targets and not mounts_token(pod, objects), key


def test_the_service_reaches_the_leaders_and_leaves_the_groups_their_own_subdomain(group):
    objects = group[1]
    assert objects["service"]["spec"]["selector"][LWS_WORKER_INDEX] == "0"  # requests reach the leaders
    assert "hpa" not in objects  # an autoscaler could add groups only to one LeaderWorkerSet, without exec rights
    # LWS makes a headless Service named after each LeaderWorkerSet for its pods' DNS names, unless one exists
    services = {o["metadata"]["name"] for o in objects.values() if o["kind"] == "Service"}
    assert not services & {lws["metadata"]["name"] for lws in leaderworkersets(objects)}


def test_ranks_fill_the_groups_pods_in_order():
    env = {"LWS_LEADER_ADDRESS": "internvl-0.internvl.serving", "LWS_GROUP_SIZE": "3"}
    hosts = lws_hosts(env)
    assert hosts == ["internvl-0.internvl.serving", "internvl-0-1.internvl.serving", "internvl-0-2.internvl.serving"]
    command = server_command(Path("/b"), 6, 8000, 8001, 8002, "tritonserver", hosts, "internvl-kube-exec")
    assert command[command.index("--host") + 1] == "internvl-0.internvl.serving:2,internvl-0-1.internvl.serving:2,internvl-0-2.internvl.serving:2"
    assert command[command.index("--mca") + 1 : command.index("--mca") + 3] == ["plm_rsh_agent", "internvl-kube-exec"]
    assert command.count("tritonserver") == 6 and command.count("--load-model=tensorrt_llm") == 5
    with pytest.raises(ValueError, match="evenly"):
        server_command(Path("/b"), 4, 8000, 8001, 8002, "tritonserver", hosts)
    with pytest.raises(ValueError, match="LWS_LEADER_ADDRESS"):
        lws_hosts({})


def test_the_exec_agent_runs_the_daemon_in_the_named_pod_and_returns_its_status(capsys):
    class FakeStream:
        def __init__(self):
            self.chunks, self.returncode = ["daemon started\n"], 3

        def is_open(self):
            return bool(self.chunks)

        def update(self, timeout):
            pass

        def peek_stdout(self):
            return bool(self.chunks)

        def read_stdout(self):
            return self.chunks.pop()

        def peek_stderr(self):
            return False

        def close(self):
            pass

    calls = []
    with mock.patch("kubernetes.config.load_incluster_config"), mock.patch("kubernetes.client.CoreV1Api"), mock.patch(
        "kubernetes.stream.stream", side_effect=lambda *a, **k: calls.append((a, k)) or FakeStream()
    ):
        status = kube_exec.exec_in_pod("internvl-0-1.internvl.serving", ["orted", "--hnp-uri", "a b"], "serving")
    assert status == 3 and "daemon started" in capsys.readouterr().out
    (args, kwargs), = calls
    assert args[1:] == ("internvl-0-1", "serving") and kwargs["command"] == ["/bin/sh", "-c", "orted --hnp-uri 'a b'"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tp-size", "4", "--nodes", "2"], "--build-claim"),
        (["--tp-size", "3", "--nodes", "2", "--build-claim", "b"], "divide"),
        (["--tp-size", "4", "--nodes", "2", "--build-claim", "b", "--llm-gpus", "0,1,2,3"], "--llm-gpus"),
        (["--tp-size", "4", "--nodes", "2", "--build-claim", "b", "--max-replicas", "3"], "--max-replicas"),
    ],
)
def test_groups_that_cannot_be_placed_are_refused(flags, message, tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "build.manifests", "--model", str(tiny), "--out", str(tmp_path), "--target", "gpu", *flags], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr
