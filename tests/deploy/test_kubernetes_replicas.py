"""The replicas overlay (k8s/overlays/replicas): three public replicas on PostgreSQL and Redis.

Rendered and validated offline as ``test_kubernetes`` does (strict Kubernetes schemas). The
public tier is a StatefulSet of three whose pods name their own audit chain and hold only their
own client identity; PostgreSQL and Redis admit only the public pods, and the private tier
reaches neither (issue 15: they are public-side state).
"""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from tests.deploy.test_kubernetes import (
    K8S,
    PRIVATE,
    PRIVATE_EGRESS,
    PUBLIC,
    _containers,
    _key,
    _render,
)

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="needs kubernetes-validate (dev)"
)

REPLICAS = K8S / "overlays" / "replicas"
POSTGRES = {"app.kubernetes.io/name": "splitvault", "app.kubernetes.io/component": "postgres"}
Resource = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], Resource]:
    return {_key(r): r for r in _render(REPLICAS)}


def _pod(rendered: dict[tuple[str, str], Resource], kind: str, name: str) -> Resource:
    pod: Resource = rendered[(kind, name)]["spec"]["template"]["spec"]
    return pod


def test_every_resource_validates_against_the_kubernetes_schemas() -> None:
    resources = _render(REPLICAS)
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, "1.33", strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{_key(resource)}: {error.message}")
    assert len({_key(r) for r in resources}) == len(resources)
    assert {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"} == {
        "splitvault"
    }


def test_the_public_tier_is_three_replicas_on_postgres(
    rendered: dict[tuple[str, str], Resource],
) -> None:
    assert ("Deployment", "splitvault-public") not in rendered
    assert ("PersistentVolumeClaim", "splitvault-public-state") not in rendered
    public = rendered[("StatefulSet", "splitvault-public")]["spec"]
    assert public["replicas"] == 3
    assert rendered[("Service", public["serviceName"])]["spec"]["clusterIP"] == "None"
    container = public["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["SPLITVAULT_PUBLIC_STATE_BACKEND"]["value"] == "postgres"
    # Each pod's stable name names its own audit chain.
    assert env["SPLITVAULT_PUBLIC_REPLICA_NAME"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    config = rendered[("ConfigMap", "splitvault-public-config")]["data"]["public.toml"]
    settings = tomllib.loads(config)
    assert settings["state_backend"] == "postgres"
    assert settings["protection"]["rate_limit_backend"] == "redis"
    assert "registry.example.com/splitvault:0.1.0" in {c["image"] for c in _containers(
        rendered[("StatefulSet", "splitvault-public")])}  # fmt: skip


def test_the_dsn_is_a_secret_file_and_each_pod_has_its_own_identity(
    rendered: dict[tuple[str, str], Resource],
) -> None:
    pod = _pod(rendered, "StatefulSet", "splitvault-public")
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    dsn_dir, _ = env["SPLITVAULT_PUBLIC_POSTGRES_DSN_FILE"].rsplit("/", 1)
    dsn = volumes[mounts[dsn_dir]["name"]]
    assert dsn["secret"]["secretName"] == "splitvault-postgres-dsn"
    assert mounts[dsn_dir]["readOnly"] is True
    # The shared TLS Secret is mounted without any client key ...
    tls = volumes[mounts["/deploy/public/tls"]["name"]]["secret"]
    assert {item["key"] for item in tls["items"]} == {"server.crt", "server.key", "ca.crt"}
    # ... and each pod's client certificate is its own, CN = its pod name (splitvault-public-K).
    client = volumes[mounts[env["SPLITVAULT_PUBLIC_CLIENT_TLS_DIR"]]["name"]]["csi"]
    attributes = client["volumeAttributes"]
    assert client["driver"] == "csi.cert-manager.io"
    assert attributes["csi.cert-manager.io/common-name"] == "${POD_NAME}"
    assert attributes["csi.cert-manager.io/certificate-file"] == "client.crt"
    assert attributes["csi.cert-manager.io/privatekey-file"] == "client.key"
    assert all("secret" not in v or "client.key" not in str(v) for v in pod["volumes"])


def test_only_the_public_pods_reach_postgres_and_redis(
    rendered: dict[tuple[str, str], Resource],
) -> None:
    for name, port in [("splitvault-postgres", 5432), ("splitvault-redis", 6379)]:
        policy = rendered[("NetworkPolicy", name)]["spec"]
        assert policy["ingress"] == [
            {"from": [{"podSelector": {"matchLabels": PUBLIC}}],
             "ports": [{"protocol": "TCP", "port": port}]},
        ]  # fmt: skip
        assert policy["egress"] == []
    assert rendered[("NetworkPolicy", "splitvault-postgres")]["spec"]["podSelector"] == {
        "matchLabels": POSTGRES
    }
    private = rendered[("NetworkPolicy", "splitvault-private")]["spec"]
    assert private["podSelector"] == {"matchLabels": PRIVATE}
    assert private["egress"] == PRIVATE_EGRESS  # its own Redis only, neither public store
    public = rendered[("NetworkPolicy", "splitvault-public")]["spec"]["egress"]
    assert {"to": [{"podSelector": {"matchLabels": POSTGRES}}],
            "ports": [{"protocol": "TCP", "port": 5432}]} in public  # fmt: skip


def test_postgres_is_hardened_with_its_password_from_a_secret(
    rendered: dict[tuple[str, str], Resource],
) -> None:
    postgres = rendered[("StatefulSet", "splitvault-postgres")]["spec"]
    pod = postgres["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "POSTGRES_PASSWORD" not in env
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"splitvault-postgres"}
    assert env["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/postgres/")
    (claim,) = postgres["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not container["image"].endswith(":latest")
