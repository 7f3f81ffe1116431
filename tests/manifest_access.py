"""What the generated manifests let each pod do through the Kubernetes API: the pod templates with the
service account each runs under, whether it gets that account's token, and which pods an account may
exec into (RoleBindings → Roles → pods/exec rules). Used by tests/test_manifests.py and
tests/test_multinode.py."""

from __future__ import annotations

def pod_templates(objects: dict[str, dict]) -> dict[str, dict]:
    """{"<file>" or "<file>/leader|worker": pod template} of every Deployment and LeaderWorkerSet."""
    pods = {}
    for key, obj in objects.items():
        if obj["kind"] == "Deployment":
            pods[key] = obj["spec"]["template"]
        elif obj["kind"] == "LeaderWorkerSet":
            template = obj["spec"]["leaderWorkerTemplate"]
            pods[f"{key}/leader"], pods[f"{key}/worker"] = template["leaderTemplate"], template["workerTemplate"]
    return pods


def account(pod: dict) -> str:
    return pod["spec"].get("serviceAccountName", "default")


def mounts_token(pod: dict, objects: dict[str, dict]) -> bool:
    """The pod's automountServiceAccountToken, else its ServiceAccount's, else Kubernetes' default (true)."""
    if "automountServiceAccountToken" in pod["spec"]:
        return pod["spec"]["automountServiceAccountToken"]
    accounts = {o["metadata"]["name"]: o for o in objects.values() if o["kind"] == "ServiceAccount"}
    return accounts.get(account(pod), {}).get("automountServiceAccountToken", True)


def exec_rules(objects: dict[str, dict]) -> list[dict]:
    assert not [o for o in objects.values() if o["kind"].startswith("Cluster")], "namespaced RBAC only"
    return [r for o in objects.values() if o["kind"] == "Role" for r in o["rules"] if "pods/exec" in r["resources"]]


def exec_targets(objects: dict[str, dict]) -> dict[str, set[str]]:
    """{service account: the pods its Roles let it exec into}; every pods/exec rule must name its pods."""
    roles = {o["metadata"]["name"]: o for o in objects.values() if o["kind"] == "Role"}
    targets: dict[str, set[str]] = {}
    for binding in (o for o in objects.values() if o["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        for rule in roles[binding["roleRef"]["name"]]["rules"]:
            if "pods/exec" in rule["resources"]:
                for subject in binding["subjects"]:
                    assert subject["kind"] == "ServiceAccount"
                    targets.setdefault(subject["name"], set()).update(rule["resourceNames"])
    return targets
