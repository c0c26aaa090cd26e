"""The real PodSecurity admission plugin admits every pod Tailor makes in a namespace labelled
`pod-security.kubernetes.io/enforce: restricted`: the builders' golden pod templates (Ray head,
workers, submitter, validation Job) and the pod of examples/cluster as Pods (server dry run), and
the head and worker Pods the real KubeRay operator renders from a golden RayJob (with its injected
`wait-gcs-ready` init container). tests/unit/test_pod_security.py checks the same rules offline;
tests/e2e runs such pods on a real node."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from operator_fixtures import REPO, wait_until

pytestmark = pytest.mark.integration

GOLDENS = sorted((REPO / "tests" / "data").glob("*/expected.yaml"))
GOLDENS = [p for p in GOLDENS if p.parent.name.startswith(("rayjob-", "inspect-"))]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if obj["kind"] == "RayJob":
        cluster = obj["spec"]["rayClusterSpec"]
        out = [("head", cluster["headGroupSpec"]["template"])]
        out += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
        return out + [("submitter", obj["spec"]["submitterPodTemplate"])]
    if obj["kind"] == "Job":
        return [("job", obj["spec"]["template"])]
    if obj["kind"] == "Pod":
        return [("pod", {"metadata": obj.get("metadata") or {}, "spec": obj["spec"]})]
    return []


def _pods() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in GOLDENS + EXAMPLES:
        for doc in _docs(path):
            for what, template in _templates(doc):
                name = str(path.relative_to(REPO))
                out.append((f"{name}:{what}", template))
    return out


PODS = _pods()


@pytest.fixture
def restricted(control_plane, namespace) -> str:
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/enforce-version=latest", check=True)
    return namespace


def _dry_run_pod(cp, namespace: str, template: dict[str, Any]) -> Any:
    spec = copy.deepcopy(template["spec"])
    # Neither is Pod Security's business, and neither exists here.
    spec.pop("serviceAccountName", None)
    spec.pop("priorityClassName", None)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "pss-check", "labels": (template.get("metadata") or {}).get("labels") or {}},
           "spec": spec}
    return cp.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(pod))


def test_admission_refuses_a_pod_without_security_context(control_plane, restricted) -> None:
    """The control: the plugin is on and enforcing in this namespace."""
    template = {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    r = _dry_run_pod(control_plane, restricted, template)
    assert r.returncode != 0 and 'violates PodSecurity "restricted:latest"' in r.stderr, r.stderr


@pytest.mark.parametrize("name,template", PODS, ids=[n for n, _ in PODS])
def test_pod_is_admitted_under_restricted(control_plane, restricted, name: str, template: dict[str, Any]) -> None:
    r = _dry_run_pod(control_plane, restricted, template)
    assert r.returncode == 0, f"{name} refused:\n{r.stderr}"
    assert "Warning" not in r.stderr, r.stderr


def test_kuberay_renders_admissible_pods_from_the_golden_rayjob(kuberay_operator, restricted, k8s_client) -> None:
    """KubeRay copies the ray container's securityContext into its wait-gcs-ready init container;
    the head and both worker Pods must be created (Pending: there is no kubelet here)."""
    cp = kuberay_operator
    docs = _docs(REPO / "tests" / "data" / "rayjob-cpu-pvc" / "expected.yaml")
    for doc in docs:
        doc["metadata"].pop("namespace", None)
        doc["metadata"].pop("ownerReferences", None)  # no owner here: the GC would delete them
    cp.kubectl("create", "-n", restricted, "-f", "-",
               input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}), check=True)
    run = next(d for d in docs if d["kind"] == "RayJob")["metadata"]["name"]

    def pods() -> Any:
        r = cp.kubectl("get", "pods", "-n", restricted, "-l", f"tailor.dev/run={run}", "-o", "json")
        items = json.loads(r.stdout)["items"] if r.returncode == 0 else []
        return items if len(items) >= 3 else None

    def events() -> str:
        return cp.kubectl("get", "events", "-n", restricted).stdout

    def diagnose() -> str:
        objs = cp.kubectl("get", "rayjob,raycluster,pods", "-n", restricted, "-o", "wide").stdout
        return f"{objs}\n{events()}\n{cp.log_tails(40)}"

    found = wait_until(pods, 90, what="head + 2 worker pods created by KubeRay", on_timeout=diagnose)
    kinds = sorted(p["metadata"]["labels"].get("ray.io/node-type", "?") for p in found)
    assert kinds == ["head", "worker", "worker"], kinds
    worker = next(p for p in found if p["metadata"]["labels"]["ray.io/node-type"] == "worker")
    init = {c["name"]: c for c in worker["spec"].get("initContainers") or []}
    sc = init["wait-gcs-ready"]["securityContext"]  # KubeRay's default (ENABLE_INIT_CONTAINER_INJECTION)
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert worker["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "violates PodSecurity" not in events()
