"""The cluster is closed by default (hardening issue, item 2): Ray's token authentication on, the
dashboard and job API reachable only by the KubeRay operator, pods non-root with no privilege
escalation, local disk bounded, an immutable image reference."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[3] / "k8s"


def _load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _clusters() -> list[dict[str, Any]]:
    (service,) = _load("rayservice.yaml")
    (job,) = _load("rayjob-merge.yaml")
    return [service["spec"]["rayClusterConfig"], job["spec"]["rayClusterSpec"]]


def _pods() -> list[dict[str, Any]]:
    return [g["template"] for c in _clusters() for g in [c["headGroupSpec"], *c["workerGroupSpecs"]]]


def test_ray_token_authentication_is_on_for_every_cluster() -> None:
    assert all(c["authOptions"] == {"mode": "token"} for c in _clusters())


def test_pods_run_non_root_without_privilege_escalation_or_capabilities() -> None:
    for pod in _pods():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert c["resources"]["limits"]["ephemeral-storage"]
            assert re.fullmatch(r"[\w./-]+(:\d+\.\d+\.\d+|@sha256:[0-9a-f]{64})", c["image"]), c["image"]


def test_only_serve_is_open_beyond_the_ray_pods() -> None:
    (policy,) = _load("networkpolicy.yaml")
    assert "networkpolicy.yaml" in (K8S / "kustomization.yaml").read_text()
    pods = policy["spec"]["podSelector"]["matchLabels"]
    assert pods == _pods()[0]["metadata"]["labels"]
    open_to_all = [r for r in policy["spec"]["ingress"] if "from" not in r]
    assert [[p["port"] for p in r["ports"]] for r in open_to_all] == [[8000]]
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if 8265 in ports:  # the job API runs code: only the KubeRay operator reaches it
            (source,) = rule["from"]
            assert source["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
