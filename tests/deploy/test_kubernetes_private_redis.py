"""The private tier's own Redis on Kubernetes (k8s/base/private-redis-*.yaml): reachable by
private pods only, its own password from its own Secret, wired into the private StatefulSet,
and never the public tier's Redis. Rendered as ``test_kubernetes`` does."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.test_kubernetes import (
    BASE,
    OVERLAY,
    PRIVATE,
    PRIVATE_REDIS,
    PUBLIC,
    _containers,
    _key,
    _render,
)

pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (dev)")

NAME = "splitvault-private-redis"
Resource = dict[str, Any]


@pytest.fixture(scope="module", params=[BASE, OVERLAY], ids=["base", "example-overlay"])
def rendered(request: pytest.FixtureRequest) -> dict[tuple[str, str], Resource]:
    return {_key(r): r for r in _render(request.param)}


def _pod(rendered: dict[tuple[str, str], Resource], kind: str, name: str) -> Resource:
    pod: Resource = rendered[(kind, name)]["spec"]["template"]["spec"]
    return pod


def test_only_private_pods_reach_the_private_redis(
    rendered: dict[tuple[str, str], Resource],
) -> None:
    policy = rendered[("NetworkPolicy", NAME)]["spec"]
    assert policy["podSelector"] == {"matchLabels": PRIVATE_REDIS}
    assert policy["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": PRIVATE}}],
         "ports": [{"protocol": "TCP", "port": 6379}]},
    ]  # fmt: skip
    assert policy["egress"] == []
    service = rendered[("Service", NAME)]["spec"]
    assert service["selector"] == PRIVATE_REDIS
    assert rendered[("Deployment", NAME)]["spec"]["template"]["metadata"]["labels"] == (
        PRIVATE_REDIS
    )
    public_egress = rendered[("NetworkPolicy", "splitvault-public")]["spec"].get("egress", [])
    assert "private-redis" not in str(public_egress)  # no public rule names it


def test_the_private_statefulset_uses_its_own_store_and_password(
    rendered: dict[tuple[str, str], Resource],
) -> None:
    pod = _pod(rendered, "StatefulSet", "splitvault-private")
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = rendered[("Service", NAME)]["spec"]["ports"][0]["port"]
    assert env["SPLITVAULT_PRIVATE_STATE_STORE__REDIS_URL"] == f"redis://{NAME}:{port}/0"
    assert env["SPLITVAULT_PRIVATE_STATE_STORE__PASSWORD_FILE"] == "/run/private-redis/password"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = mounts["/run/private-redis"]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["secret"]["secretName"] == NAME
    public = _pod(rendered, "Deployment", "splitvault-public")
    assert NAME not in str(public)  # the public tier holds neither the password nor the URL


def test_the_store_is_password_protected_persistent_and_hardened(
    rendered: dict[tuple[str, str], Resource],
) -> None:
    deployment = rendered[("Deployment", NAME)]["spec"]
    pod = deployment["template"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    (container,) = _containers(rendered[("Deployment", NAME)])
    script = " ".join(container["args"])
    assert "requirepass" in script and "redis-server -" in script  # password on stdin
    assert "--appendonly yes" in script  # nonces and budgets survive a restart
    assert "/run/private-redis/password" in script
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["password"]["secret"]["secretName"] == NAME
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in rendered
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_the_public_redis_still_admits_only_public_pods(
    rendered: dict[tuple[str, str], Resource],
) -> None:
    policy = rendered[("NetworkPolicy", "splitvault-redis")]["spec"]
    assert [r["from"] for r in policy["ingress"]] == [[{"podSelector": {"matchLabels": PUBLIC}}]]
