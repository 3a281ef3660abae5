"""deploy/kubernetes: every manifest is valid against the Kubernetes API schemas (offline,
strict: an unknown or misspelt field fails), the kustomization lists what exists, and the
objects fit together and fit the daemon: the readiness probe asks the peer listener's
health path on the default `[peers] listen` port, the headless Service selects the
DaemonSet's pods on that port, the RBAC lets the Service's EndpointSlices be read in its
namespace, and the `[peers]` examples in docs/kubernetes.md load and name these objects."""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from snapshotter import config
from snapshotter.peers.address import parse_address
from snapshotter.peers.listener import HEALTH_PATH

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
DOC = REPO / "docs" / "kubernetes.md"
OPT_IN = {"host-token.yaml", "nodes-rolebinding.yaml"}
"""Manifests applied on their own, by choice (docs/kubernetes.md), not by the kustomization."""
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
"""The oldest and the newest Kubernetes the manifests are checked against."""

Doc = dict[str, Any]


def manifests() -> Iterator[tuple[str, Doc]]:
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path.name, doc


ALL = list(manifests())


def one(kind: str, name: str | None = None) -> Doc:
    found = [
        d for _, d in ALL if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def default_port() -> int:
    return parse_address(config.Config().peers.listen)[1]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("file", "doc"), ALL, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in ALL]
)
def test_every_manifest_is_valid_against_the_schemas(file: str, doc: Doc, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_does_catch_mistakes() -> None:
    daemonset = copy.deepcopy(one("DaemonSet"))
    kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)
    daemonset["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)
    probe = copy.deepcopy(one("DaemonSet"))
    probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "5"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(probe, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_kustomization_lists_every_manifest_but_the_opt_in_ones() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - OPT_IN
    assert files >= OPT_IN


def test_everything_lives_in_one_namespace() -> None:
    namespace = one("Namespace")["metadata"]["name"]
    for file, doc in ALL:
        if doc["kind"] in ("Namespace", "ClusterRole"):
            assert "namespace" not in doc["metadata"], file
        else:
            assert doc["metadata"]["namespace"] == namespace, (file, doc["kind"])
    # host networking is forbidden by the baseline and restricted Pod Security levels
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_the_daemonset_runs_everywhere_and_only_carries_readiness() -> None:
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    # one toleration with no key and no effect tolerates every taint
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert re.fullmatch(r"registry\.k8s\.io/pause:[0-9.]+", container["image"])
    assert "command" not in container and "args" not in container
    assert "livenessProbe" not in container  # restarting pause would change nothing
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "volumes" not in pod


def test_the_probe_asks_the_daemons_health_path_on_the_default_peer_port() -> None:
    daemonset = one("DaemonSet")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == HEALTH_PATH
    assert probe["port"] == default_port()
    assert probe.get("scheme", "HTTP") == "HTTP"
    assert "host" not in probe  # the pod's address: with the host network, the node's
    (port,) = container["ports"]
    assert port["containerPort"] == default_port()
    # a node stops being a member within two failed probes
    timing = container["readinessProbe"]
    assert timing["periodSeconds"] * timing["failureThreshold"] <= 10


def test_the_headless_service_selects_the_daemonset_on_the_peer_port() -> None:
    service = one("Service")
    daemonset = one("DaemonSet")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"].get("publishNotReadyAddresses", False) is False
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == port["targetPort"] == default_port()
    assert port.get("protocol", "TCP") == "TCP"


def test_the_rbac_reads_the_services_endpointslices_in_its_namespace() -> None:
    service = one("Service")
    role = one("ClusterRole")
    account = one("ServiceAccount")
    (rule,) = role["rules"]
    # what snapshotter.peers.kube asks: a list of discovery.k8s.io/v1 EndpointSlices
    assert rule["apiGroups"] == ["discovery.k8s.io"]
    assert rule["resources"] == ["endpointslices"]
    assert {"get", "list", "watch"} == set(rule["verbs"])
    bindings = [d for _, d in ALL if d["kind"] == "RoleBinding"]
    assert bindings and not [d for _, d in ALL if d["kind"] == "ClusterRoleBinding"]
    for binding in bindings:
        assert binding["metadata"]["namespace"] == service["metadata"]["namespace"]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        }
    subjects = [s for b in bindings for s in b["subjects"]]
    assert {
        "kind": "ServiceAccount",
        "name": account["metadata"]["name"],
        "namespace": account["metadata"]["namespace"],
    } in subjects
    token = one("Secret")
    assert token["type"] == "kubernetes.io/service-account-token"
    assert token["metadata"]["annotations"] == {
        "kubernetes.io/service-account.name": account["metadata"]["name"]
    }


def test_critical_pods_are_admitted_where_a_quota_must_allow_them() -> None:
    quota = one("ResourceQuota")
    (expression,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert expression["scopeName"] == "PriorityClass"
    assert expression["values"] == [
        one("DaemonSet")["spec"]["template"]["spec"]["priorityClassName"]
    ]
    assert int(quota["spec"]["hard"]["pods"]) >= 5000  # Kubernetes' largest tested cluster


def doc_peer_tables() -> list[dict[str, Any]]:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    tables = [tomllib.loads(b) for b in blocks]
    return [t for t in tables if "peers" in t]


def test_the_documented_peer_settings_load_and_name_these_objects() -> None:
    service = one("Service")
    namespace, name = service["metadata"]["namespace"], service["metadata"]["name"]
    tables = doc_peer_tables()
    assert len(tables) >= 2
    seen: set[str] = set()
    for table in tables:
        cfg = config.from_mapping(table)
        assert cfg.peers.enable
        assert parse_address(cfg.peers.listen)[1] == default_port()
        if cfg.peers.dns:
            assert cfg.peers.dns == f"{name}.{namespace}.svc.cluster.local"
            assert cfg.peers.dns_servers, "a host daemon cannot use the pods' resolver"
            seen.add("dns")
        if cfg.peers.kubernetes_service:
            assert cfg.peers.kubernetes_service == f"{namespace}/{name}"
            seen.add("kubernetes_service")
    assert seen == {"dns", "kubernetes_service"}
