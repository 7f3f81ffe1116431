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

from build.manifests import LWS_WORKER_INDEX
from tests.doc_commands import module_invocations, parse_exactly
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


def test_core_objects_validate_strictly_and_the_group_pod_templates_too(group, tmp_path):
    out, objects = group
    assert "deployment" not in objects
    core = [p for p in sorted((out / "k8s").glob("*.yaml")) if p.stem != "leaderworkerset"]
    lws = objects["leaderworkerset"]["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):  # no schema for the CRD: its pod templates as PodTemplates
        path = tmp_path / f"{role}.yaml"
        path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}, "template": lws[role]}))
        core.append(path)
    result = subprocess.run([str(VALIDATE), "--strict", *map(str, core)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.count("passed") == len(core), result.stdout + result.stderr


def test_the_leaderworkerset_uses_only_its_api_fields(group):
    lws = group[1]["leaderworkerset"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and set(lws["spec"]) <= LWS_SPEC_FIELDS
    template = lws["spec"]["leaderWorkerTemplate"]
    assert set(template) <= LWS_TEMPLATE_FIELDS and template["restartPolicy"] in LWS_RESTART_POLICIES
    assert template["size"] == 2 and lws["spec"]["replicas"] == 2


def test_gpus_per_pod_and_the_shared_build(group):
    lws = group[1]["leaderworkerset"]["spec"]["leaderWorkerTemplate"]
    (leader, openai), (worker,) = lws["leaderTemplate"]["spec"]["containers"], lws["workerTemplate"]["spec"]["containers"]
    assert openai["name"] == "openai"  # the leader serves the API; workers only run ranks
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == 2  # ranks 0-1 (vision shares GPU 0)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2  # ranks 2-3
    for pod in (lws["leaderTemplate"], lws["workerTemplate"]):
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
        assert claims["build"] == "shared-build"  # every node reads the engines the leader built
    assert "readinessProbe" in leader and "readinessProbe" not in worker and worker["command"] == ["sleep", "infinity"]


def test_the_leader_runs_the_images_build_then_every_rank_through_the_pods(group):
    lws = group[1]["leaderworkerset"]["spec"]["leaderWorkerTemplate"]
    leader, _ = lws["leaderTemplate"]["spec"]["containers"]
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


def test_the_leaders_pods_exec_rights_and_service(group):
    objects = group[1]
    name = objects["leaderworkerset"]["metadata"]["name"]
    rules = objects["role"]["rules"]
    assert any("pods/exec" in r["resources"] and "create" in r["verbs"] for r in rules)
    assert objects["rolebinding"]["subjects"] == [{"kind": "ServiceAccount", "name": name}]
    lws = objects["leaderworkerset"]["spec"]["leaderWorkerTemplate"]
    assert lws["leaderTemplate"]["spec"]["serviceAccountName"] == name
    assert objects["service"]["spec"]["selector"][LWS_WORKER_INDEX] == "0"  # requests reach the leaders
    assert objects["hpa"]["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"


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
    ],
)
def test_groups_that_cannot_be_placed_are_refused(flags, message, tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "build.manifests", "--model", str(tiny), "--out", str(tmp_path), "--target", "gpu", *flags], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr
