"""`make deploy-manifests` (issue 12, item 8): Kubernetes manifests from the same settings as the model
repository, validated offline with kubernetes-validate --strict, and consistent with the settings and
the images: GPU requests = the GPUs the build places models on, the images' ports and volumes, the
build flags the pods rebuild with, Triton's health endpoints and metrics port."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from build.manifests import OPENAI_PORT, PORTS, build_flags, gpu_count
from build.settings import BuildSettings, GpuSettings, from_arguments
from tests.doc_commands import module_parser
from tests.manifest_access import account, exec_rules, exec_targets, mounts_token, pod_templates
from tests.test_deploy_images import IMAGES, _one

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")  # the kubernetes-validate wheel's script
CASES = {  # name: (target, build flags, GPUs one replica uses)
    "cpu": ("cpu", ["--max-images", "3", "--llm-max-batch-size", "4"], 0),
    "gpu-default-placement": ("gpu", ["--tp-size", "2"], 2),  # vision shares GPU 0 with rank 0
    "gpu-separate-vision": ("gpu", ["--tp-size", "2", "--llm-gpus", "1,2", "--kv-cache-free-gpu-mem-fraction", "0.7"], 3),
}


def _generate(tiny, out: Path, target: str, flags: list[str], extra=()) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "build.manifests", "--model", str(tiny), "--out", str(out), "--target", target, *flags, *extra],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {p.stem: yaml.safe_load(p.read_text()) for p in (out / "k8s").glob("*.yaml")}


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda c: f"manifests-{c}")  # not "gpu": that id marks GPU-only tests
def generated(request, tiny, tmp_path_factory):
    target, flags, gpus = CASES[request.param]
    out = tmp_path_factory.mktemp("deploy")
    return out, target, flags, gpus, _generate(tiny, out, target, flags, ["--replicas", "2", "--image", f"registry.example/internvl:{target}"])


def validate_strict(out: Path) -> None:
    files = sorted((out / "k8s").glob("*.yaml"))
    result = subprocess.run([str(VALIDATE), "--strict", *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files)


def test_manifests_pass_kubernetes_validate_strict(generated):
    validate_strict(generated[0])


def parse_openai_args(command: list[str]):
    from openai_api.__main__ import parser

    assert command[:3] == ["python3", "-m", "openai_api"]
    return parser().parse_args(command[3:])


def test_gpu_requests_ports_probes_and_metrics_follow_the_build_and_the_image(generated):
    _, target, flags, gpus, objects = generated
    pod = objects["deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    image_ports = {int(p) for p in _one(IMAGES[target], "EXPOSE").split()}
    assert {p["containerPort"] for p in container["ports"]} == set(PORTS.values())
    assert image_ports == set(PORTS.values()) | {OPENAI_PORT}
    assert {p["name"]: p["port"] for p in objects["service"]["spec"]["ports"]} == PORTS
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(PORTS["metrics"])
    hpa = objects["hpa"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["deployment"]["metadata"]["name"] and hpa["minReplicas"] == 2
    assert container["image"] == f"registry.example/internvl:{target}"


def test_the_openai_front_is_its_own_deployment_pointed_at_tritons_service(generated):
    _, _, _, _, objects = generated
    triton = objects["deployment"]["spec"]["template"]["spec"]["containers"][0]
    front = objects["openai-deployment"]["spec"]["template"]
    (openai,) = front["spec"]["containers"]
    assert openai["image"] == triton["image"] and openai["ports"] == [{"name": "openai", "containerPort": OPENAI_PORT}]
    args = parse_openai_args(openai["command"])
    assert (args.triton_url, args.host, args.port) == (f"{objects['service']['metadata']['name']}:{PORTS['grpc']}", "0.0.0.0", OPENAI_PORT)
    assert openai["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}  # 503 until Triton's models are ready
    assert openai["resources"]["limits"] == {"memory": "1Gi"} and "volumes" not in front["spec"]  # a stateless proxy
    service = objects["openai-service"]["spec"]
    assert service["ports"] == [{"name": "openai", "port": OPENAI_PORT, "targetPort": "openai"}]
    assert service["selector"].items() <= front["metadata"]["labels"].items()
    assert not objects["service"]["spec"]["selector"].items() <= front["metadata"]["labels"].items()  # Triton's Service: not the front


def test_no_pod_can_exec_and_none_mounts_a_token_it_does_not_use(generated):
    objects = generated[4]
    assert exec_rules(objects) == [] and exec_targets(objects) == {}
    pods = pod_templates(objects)
    assert sorted(pods) == ["deployment", "openai-deployment"]
    assert not [key for key, pod in pods.items() if mounts_token(pod, objects)]  # neither talks to the Kubernetes API
    front = pods["openai-deployment"]
    assert objects["openai-serviceaccount"]["metadata"]["name"] == account(front) != "default"  # an account no one else binds


def test_the_api_key_comes_from_the_named_secret(generated, tiny, tmp_path):
    def key_env(objects):
        (openai,) = objects["openai-deployment"]["spec"]["template"]["spec"]["containers"]
        return [e for e in openai.get("env", []) if e["name"] == "INTERNVL_API_KEY"]

    assert key_env(generated[4]) == [] and "openai-service" in generated[4]
    objects = _generate(tiny, tmp_path, "cpu", ["--api-key-secret", "internvl-api-key"])
    assert key_env(objects) == [{"name": "INTERNVL_API_KEY", "valueFrom": {"secretKeyRef": {"name": "internvl-api-key", "key": "api-key"}}}]
    validate_strict(tmp_path)


def test_a_second_run_leaves_only_its_own_files(tiny, tmp_path):
    """`kubectl apply -f OUT/k8s` must not apply objects of an earlier layout (e.g. an old role.yaml)."""
    multi = set(_generate(tiny, tmp_path, "gpu", ["--tp-size", "2", "--nodes", "2", "--build-claim", "builds"]))
    single = set(_generate(tiny, tmp_path, "cpu", []))
    assert multi - single  # the layouts differ, so the check below can fail
    assert {p.stem for p in (tmp_path / "k8s").iterdir()} == single


def test_pods_rebuild_with_the_same_settings_at_the_images_paths(generated):
    _, target, flags, _, objects = generated
    (container,) = objects["deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    image_env = dict(kv.split("=", 1) for kv in shlex.split(_one(IMAGES[target], "ENV")))
    assert env["MODEL"] == image_env["MODEL"] and env["OUT"] == image_env["OUT"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {env["MODEL"], env["OUT"], "/dev/shm"} <= mounts
    # BUILD_ARGS, as the image's start command passes them to build.repository, give the same settings
    parser = module_parser("build.repository")
    pod_build = vars(parser.parse_args(["--model", "m", "--out", "o", *shlex.split(env["BUILD_ARGS"])]))
    asked = vars(parser.parse_args(["--model", "m", "--out", "o", "--target", target, *flags]))
    assert pod_build == asked


def test_build_flags_reproduce_settings_and_gpu_counts():
    gpu = GpuSettings(tp_size=2, vision_gpus=(3,), llm_gpus=(0, 1), enable_kv_cache_reuse=False)
    settings = BuildSettings(max_images=1)
    args = vars(module_parser("build.repository").parse_args(["--model", "m", "--out", "o", *build_flags(settings, gpu, "gpu")]))
    assert (from_arguments(GpuSettings, args), from_arguments(BuildSettings, args)) == (gpu, settings)
    assert gpu_count(gpu) == 3 and gpu_count(GpuSettings()) == 1 and gpu_count(GpuSettings(tp_size=4)) == 4
    # the placement is written out even where it is the default (docs/DEPLOY.md: the flags given are kept)
    default_vision = build_flags(BuildSettings(), GpuSettings(tp_size=2, vision_gpus=(0,), llm_gpus=(1, 2)), "gpu")
    assert " ".join(default_vision) == "--target gpu --tp-size 2 --vision-gpus 0 --llm-gpus 1,2"


def test_the_docs_example_without_its_checkpoint_here_says_what_is_missing(tmp_path):
    """docs/DEPLOY.md's example names /models/r1v-38b; on a machine without it the one line says why."""
    missing = tmp_path / "r1v-38b"
    result = subprocess.run(
        [sys.executable, "-m", "build.manifests", "--model", str(missing), "--out", str(tmp_path / "deploy"), "--target", "gpu", "--tp-size", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "deploy").exists()
    assert result.stderr == (
        f"error: --model {missing}: no such directory on this machine; the manifests are written from the checkpoint "
        "here (its config.json checks the settings): copy or mount it here (the pods read theirs from --model-claim)\n"
    )


def test_gpu_flags_on_a_cpu_deployment_are_refused(tiny, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "build.manifests", "--model", str(tiny), "--out", str(tmp_path), "--tp-size", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "--target gpu" in result.stderr and not (tmp_path / "k8s").exists()


def test_make_deploy_manifests_runs_the_generator():
    dry = subprocess.run(["make", "-n", "deploy-manifests", "MODEL=/m", "OUT=/o", "TARGET=gpu"], capture_output=True, text=True, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    assert "-m build.manifests --model /m --out /o --target gpu" in dry.stdout


def test_make_deploy_manifests_makes_the_default_checkpoint_first_with_the_cpu_environment():
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", "deploy-manifests", "OUT=/o", "TARGET=gpu"], capture_output=True, text=True, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    make = next(i for i, line in enumerate(lines) if ".venv/bin/python -m build.checkpoint --preset tiny --llm qwen3 --out artifacts/checkpoints/tiny-qwen3" in line)
    generate = next(i for i, line in enumerate(lines) if ".venv/bin/python -m build.manifests --model artifacts/checkpoints/tiny-qwen3" in line)
    assert make < generate


def test_make_deploy_manifests_works_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True, cwd=ROOT, check=True)
    for name in filter(None, files.stdout.split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    (clone / ".venv").symlink_to(ROOT / ".venv")  # -o: the shared environment is never reinstalled from here
    result = subprocess.run(["make", "-o", ".venv/.installed", "deploy-manifests", f"OUT={tmp_path / 'deploy'}"], capture_output=True, text=True, cwd=clone)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (clone / "artifacts/checkpoints/tiny-qwen3/config.json").is_file() and (tmp_path / "deploy/k8s/deployment.yaml").is_file()
