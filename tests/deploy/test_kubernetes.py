"""The Kubernetes manifests (k8s/) are valid and keep the security promises of compose.yaml.

Every manifest is validated offline against the Kubernetes JSON schemas that
``kubernetes-validate`` ships (strict: unknown fields fail). There is no kustomize binary in
CI, so ``_render`` applies the few kustomization features the files use (resources, namespace,
images, replicas, labels, strategic-merge patches of maps); the rendered example overlay is
validated too.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="needs kubernetes-validate (dev)"
)

K8S = Path(__file__).resolve().parents[2] / "k8s"
BASE, OVERLAY = K8S / "base", K8S / "overlays" / "example"
KUBERNETES_VERSION = "1.33"
PRIVATE = {"app.kubernetes.io/name": "splitvault", "app.kubernetes.io/component": "private"}
PUBLIC = {"app.kubernetes.io/name": "splitvault", "app.kubernetes.io/component": "public"}
PRIVATE_REDIS = {
    "app.kubernetes.io/name": "splitvault",
    "app.kubernetes.io/component": "private-redis",
}
KUBE_DNS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
# The private tier's only connections: its own Redis, and the cluster DNS that names it.
PRIVATE_EGRESS = [
    {"to": [{"podSelector": {"matchLabels": PRIVATE_REDIS}}],
     "ports": [{"protocol": "TCP", "port": 6379}]},
    {"to": [KUBE_DNS],
     "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
]  # fmt: skip
HEALTH_PRIVATE = ["splitvault", "health", "private", "--deploy", "/deploy"]
# The workload of each component: the private tier keeps per-replica state (StatefulSet).
KINDS = {
    "splitvault-private": "StatefulSet",
    "splitvault-public": "Deployment",
    "splitvault-redis": "Deployment",
}

Resource = dict[str, Any]


def _documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(target: Resource, patch: Resource) -> None:
    """Strategic merge for maps only (what the example's patches need)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _containers(resource: Resource) -> list[Resource]:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _render(folder: Path) -> list[Resource]:
    """A kustomization's output, for the features these files use."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {
        "apiVersion", "kind", "resources", "namespace", "images", "replicas", "labels", "patches",
    }  # fmt: skip
    assert not unsupported, f"_render does not know {unsupported}"
    resources: list[Resource] = []
    for entry in kustomization["resources"]:
        path = folder / entry
        resources += _render(path) if path.is_dir() else _documents(path)
    for label in kustomization.get("labels", []):
        assert not label.get("includeSelectors")
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label["pairs"])
    for patch in kustomization.get("patches", []):
        change = _documents(folder / patch["path"])[0]
        target = next(r for r in resources if _key(r) == _key(change))
        if change.get("$patch") == "delete":
            resources.remove(target)
            continue
        _merge(target, change)
    for replicas in kustomization.get("replicas", []):
        next(r for r in resources if r["metadata"]["name"] == replicas["name"])["spec"][
            "replicas"
        ] = replicas["count"]
    for image in kustomization.get("images", []):
        for container in (c for r in resources for c in _containers(r)):
            name, _, _ = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] != "Namespace":
                resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


def _key(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], Resource]:
    return {_key(r): r for r in _render(BASE)}


@pytest.fixture(scope="module")
def overlay() -> dict[tuple[str, str], Resource]:
    return {_key(r): r for r in _render(OVERLAY)}


def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    files = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == files


@pytest.mark.parametrize("folder", [BASE, OVERLAY], ids=["base", "example-overlay"])
def test_every_resource_validates_against_the_kubernetes_schemas(folder: Path) -> None:
    resources = _render(folder)
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{_key(resource)}: {path}: {error.message}")
    assert len({_key(r) for r in resources}) == len(resources)


def test_base_is_namespace_agnostic(base: dict[tuple[str, str], Resource]) -> None:
    assert not [key for key, r in base.items() if "namespace" in r["metadata"]]
    assert ("Namespace", "splitvault") not in base


def test_example_overlay_sets_namespace_images_and_replicas(
    overlay: dict[tuple[str, str], Resource],
) -> None:
    assert {r["metadata"].get("namespace") for k, r in overlay.items() if k[0] != "Namespace"} == {
        "splitvault"
    }
    assert overlay[("StatefulSet", "splitvault-private")]["spec"]["replicas"] == 3
    images = {c["image"] for r in overlay.values() for c in _containers(r)}
    assert "registry.example.com/splitvault:0.1.0" in images
    assert overlay[("Service", "splitvault-public")]["spec"]["type"] == "LoadBalancer"
    labels = overlay[("Namespace", "splitvault")]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def _rules_for_port(policy: Resource, port: int) -> list[Resource]:
    return [
        rule
        for rule in policy["spec"]["ingress"]
        if any(p["port"] == port for p in rule.get("ports", []))
    ]


def test_private_tier_admits_only_public_pods_on_grpc(
    base: dict[tuple[str, str], Resource],
) -> None:
    policy = base[("NetworkPolicy", "splitvault-private")]
    deployment = base[("StatefulSet", "splitvault-private")]
    public_pods = base[("Deployment", "splitvault-public")]["spec"]["template"]["metadata"]
    assert policy["spec"]["podSelector"] == {"matchLabels": PRIVATE}
    assert deployment["spec"]["template"]["metadata"]["labels"] == PRIVATE
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert all(rule.get("ports") for rule in policy["spec"]["ingress"]), "a rule opens all ports"
    assert _rules_for_port(policy, 50051) == [
        {"from": [{"podSelector": {"matchLabels": PUBLIC}}],
         "ports": [{"protocol": "TCP", "port": 50051}]},
    ]  # fmt: skip
    assert public_pods["labels"] == PUBLIC
    assert policy["spec"]["egress"] == PRIVATE_EGRESS  # its own Redis and DNS, nothing else
    redis = base[("NetworkPolicy", "splitvault-redis")]
    assert [r["from"] for r in redis["spec"]["ingress"]] == [
        [{"podSelector": {"matchLabels": PUBLIC}}]
    ]


MONITORING = [{"namespaceSelector": {"matchLabels": {"splitvault.io/monitoring": "true"}}}]


@pytest.mark.parametrize(
    ("tier", "port", "metrics_port"),
    [("private", 50051, 9464), ("public", 8443, 9465)],
)
def test_metrics_ports_admit_only_the_monitoring_namespace(
    base: dict[tuple[str, str], Resource], tier: str, port: int, metrics_port: int
) -> None:
    policy = base[("NetworkPolicy", f"splitvault-{tier}")]
    assert _rules_for_port(policy, metrics_port) == [
        {"from": MONITORING, "ports": [{"protocol": "TCP", "port": metrics_port}]}
    ]
    (serving,) = _rules_for_port(policy, port)
    assert [p["port"] for p in serving["ports"]] == [port]  # the metrics port is not open to all
    container = _pod(base, f"splitvault-{tier}")["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[f"SPLITVAULT_{tier.upper()}_METRICS_PORT"] == str(metrics_port)
    assert {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"} in container[
        "ports"
    ]


def test_private_service_is_headless_for_round_robin(
    base: dict[tuple[str, str], Resource],
) -> None:
    service = base[("Service", "splitvault-private")]["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"] == PRIVATE
    assert [p["port"] for p in service["ports"]] == [50051]
    public = base[("Deployment", "splitvault-public")]["spec"]["template"]["spec"]
    args = public["containers"][0]["args"]
    assert args[args.index("--private") + 1] == "splitvault-private:50051"


def _pod(base: dict[tuple[str, str], Resource], name: str) -> Resource:
    pod: Resource = base[(KINDS[name], name)]["spec"]["template"]["spec"]
    return pod


@pytest.mark.parametrize("name", ["splitvault-private", "splitvault-public", "splitvault-redis"])
def test_pods_are_hardened_with_resources(base: dict[tuple[str, str], Resource], name: str) -> None:
    pod = _pod(base, name)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in _containers(base[(KINDS[name], name)]):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert not context.get("privileged", False)
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, container["name"]


def test_probes_check_health_endpoints(base: dict[tuple[str, str], Resource]) -> None:
    private = _pod(base, "splitvault-private")["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert private[probe]["exec"]["command"][:5] == HEALTH_PRIVATE, probe
    # Ready only when every model loaded; alive (not restarted) while the tier answers at all.
    assert "--live" not in private["readinessProbe"]["exec"]["command"]
    for probe in ("startupProbe", "livenessProbe"):
        assert private[probe]["exec"]["command"][-1] == "--live", probe
    public = _pod(base, "splitvault-public")["containers"][0]
    paths = {probe: public[probe]["httpGet"] for probe in ("readinessProbe", "livenessProbe")}
    assert paths["readinessProbe"]["path"] == "/v2/health/ready"
    assert paths["livenessProbe"]["path"] == "/v2/health/live"
    assert {get["scheme"] for get in paths.values()} == {"HTTPS"}
    assert public["startupProbe"]["httpGet"]["scheme"] == "HTTPS"


def _mounts(pod: Resource) -> dict[str, tuple[Resource, Resource | None]]:
    """mountPath -> (volumeMount, volume) of the pod's main container; the volume is None for a
    mount a StatefulSet's volumeClaimTemplate serves."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = pod["containers"][0]["volumeMounts"]
    return {m["mountPath"]: (m, volumes.get(m["name"])) for m in mounts}


def test_kek_and_certificates_come_from_secrets_read_only(
    base: dict[tuple[str, str], Resource],
) -> None:
    private = _mounts(_pod(base, "splitvault-private"))
    env = {e["name"]: e["value"] for e in _pod(base, "splitvault-private")["containers"][0]["env"]}
    mount, volume = private["/run/secrets"]
    assert volume is not None
    assert volume["secret"]["secretName"] == "splitvault-kek" and mount["readOnly"] is True
    assert env["SPLITVAULT_PRIVATE_KEK_FILE"] == "/run/secrets/kek"
    assert volume["secret"]["items"] == [{"key": "kek", "path": "kek"}]
    for pod, tls, secret in [
        (private, "/deploy/private/tls", "splitvault-private-tls"),
        (_mounts(_pod(base, "splitvault-public")), "/deploy/public/tls", "splitvault-public-tls"),
    ]:
        mount, volume = pod[tls]
        assert volume is not None
        assert volume["secret"]["secretName"] == secret and mount["readOnly"] is True
    public_secrets = {
        v["secret"]["secretName"]
        for v in _pod(base, "splitvault-public")["volumes"]
        if "secret" in v
    }
    assert public_secrets == {"splitvault-public-tls"}  # never the KEK or the private certificate


def _env(pod: Resource) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["containers"][0]["env"]}


@pytest.mark.parametrize("tier", ["public", "private"])
def test_only_the_state_is_writable(base: dict[tuple[str, str], Resource], tier: str) -> None:
    """Besides /tmp, each tier writes only its state folder, which its settings name."""
    pod = _pod(base, f"splitvault-{tier}")
    writable = {path for path, (mount, _) in _mounts(pod).items() if not mount.get("readOnly")}
    assert writable == {"/tmp", f"/state/{tier}"}
    assert _env(pod)[f"SPLITVAULT_{tier.upper()}_STATE_DIR"] == f"/state/{tier}"


def test_public_state_is_one_claim(base: dict[tuple[str, str], Resource]) -> None:
    _, state = _mounts(_pod(base, "splitvault-public"))["/state/public"]
    assert state is not None
    assert state["persistentVolumeClaim"]["claimName"] == "splitvault-public-state"
    assert ("PersistentVolumeClaim", "splitvault-public-state") in base


@pytest.mark.parametrize("view", ["base", "overlay"])
def test_every_private_replica_has_its_own_state_volume(
    base: dict[tuple[str, str], Resource], overlay: dict[tuple[str, str], Resource], view: str
) -> None:
    private = (base if view == "base" else overlay)[("StatefulSet", "splitvault-private")]["spec"]
    assert private["serviceName"] == "splitvault-private"  # the headless Service
    (claim,) = private["volumeClaimTemplates"]
    mount, volume = _mounts(private["template"]["spec"])["/state/private"]
    assert mount["name"] == claim["metadata"]["name"] and volume is None
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Evidence outlives pods, scale-downs and the StatefulSet itself.
    assert private["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    assert private["template"]["spec"]["securityContext"]["fsGroup"] == 10001


def test_public_tier_shares_limits_through_redis(base: dict[tuple[str, str], Resource]) -> None:
    config = base[("ConfigMap", "splitvault-public-config")]["data"]
    settings = tomllib.loads(config["public.toml"])["protection"]
    assert settings["rate_limit_backend"] == "redis"
    service = base[("Service", "splitvault-redis")]
    port = service["spec"]["ports"][0]["port"]
    assert settings["redis_url"] == f"redis://{service['metadata']['name']}:{port}/0"
    assert config["terms.md"].strip()


def test_splitvault_images_share_one_tag(base: dict[tuple[str, str], Resource]) -> None:
    images = [c["image"] for r in base.values() for c in _containers(r)]
    tiers = {image for image in images if image.startswith("splitvault:")}
    assert tiers == {"splitvault:0.1.0"}
    assert all(":" in image and not image.endswith(":latest") for image in images)
