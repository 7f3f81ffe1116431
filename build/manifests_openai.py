"""The OpenAI-compatible front's manifests (build/manifests.py): `python -m openai_api` in its own
Deployment and Service, from the same image as Triton, pointed at Triton's Service.

It is stateless (the conversation, the images and the model all go to Triton) and scales on its own. It
serves anyone who reaches its Service unless --api-key-secret names a Secret with the key; it uses no
Kubernetes API, so its ServiceAccount has no RoleBinding and no token is mounted.
"""

from __future__ import annotations

OPENAI_PORT = 9000  # EXPOSEd by both images
API_KEY_ENV, API_KEY_SECRET_KEY = "INTERNVL_API_KEY", "api-key"  # the variable openai_api reads its key from


def openai_front(name: str, image: str, triton_url: str, replicas: int, api_key_secret: str | None) -> dict[str, dict]:
    """-> {file stem: object}: the Deployment, its Service and its ServiceAccount, all named <name>-openai."""
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "openai"}
    meta = {"name": f"{name}-openai", "labels": labels}
    container = {
        "name": "openai",
        "image": image,
        "command": ["python3", "-m", "openai_api", "--triton-url", triton_url, "--host", "0.0.0.0", "--port", str(OPENAI_PORT)],
        "ports": [{"name": "openai", "containerPort": OPENAI_PORT}],
        # /health is 503 until Triton's models are ready (its first start builds for up to 2 h): ready then; alive while it listens
        "readinessProbe": {"httpGet": {"path": "/health", "port": "openai"}, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {"tcpSocket": {"port": "openai"}, "periodSeconds": 10, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    if api_key_secret:
        container["env"] = [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": api_key_secret, "key": API_KEY_SECRET_KEY}}}]
    pod_spec = {"serviceAccountName": meta["name"], "automountServiceAccountToken": False, "containers": [container]}
    return {
        "openai-deployment": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
        },
        "openai-service": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"selector": labels, "ports": [{"name": "openai", "port": OPENAI_PORT, "targetPort": "openai"}]},
        },
        "openai-serviceaccount": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": False},
    }
