"""The trainer's ServiceAccount, Role and RoleBinding: built (pure), and made sure of by the
operator before a trainer pod is created (Cluster.ensure over an in-memory API server, faked at
Cluster.request, the transport seam). The real API server and the chart's RBAC: tests/integration/
test_chart.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest

from tailor_operator.builders.trainer_access import TRAINER_RULES, build_trainer_access
from tailor_operator.cluster import KINDS, ApiError, Cluster, Conflict, NotFound
from tailor_operator.handlers.context import Context
from tailor_operator.metrics import Metrics
from tailor_operator.reconcile.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]


class MemoryApi(Cluster):
    """Cluster whose transport is a dict of objects by path; `forbidden` plurals refuse creation."""

    def __init__(self, forbidden: tuple[str, ...] = ()) -> None:
        super().__init__(api_client=object())
        self.objects: dict[str, dict[str, Any]] = {}
        self.forbidden = forbidden
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, path: str, *, body: Any = None, query: Optional[dict[str, Any]] = None,
                content_type: str = "application/json") -> Any:
        self.calls.append((method, path))
        if method == "GET":
            if path not in self.objects:
                raise NotFound(404, "Not Found", json.dumps({"message": f"{path} not found"}))
            return self.objects[path]
        if method == "POST":
            plural = path.rsplit("/", 1)[1]
            if plural in self.forbidden:
                raise ApiError(403, "Forbidden", json.dumps({"message": f'{plural} is forbidden: User "op" '
                                                                       f'cannot create resource "{plural}"'}))
            key = f"{path}/{body['metadata']['name']}"
            if key in self.objects:
                raise Conflict(409, "Conflict", json.dumps({"message": "already exists"}))
            self.objects[key] = body
            return body
        raise AssertionError(f"unexpected {method} {path}: existing objects must never be changed")

    def path_of(self, kind: str, namespace: str, name: str) -> str:
        group, version, plural = KINDS[kind]
        base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
        return f"{base}/namespaces/{namespace}/{plural}/{name}"


def _context(cluster: Cluster, tmp_path: Path, account: Optional[str] = "tailor-trainer") -> Context:
    return Context(settings=OperatorSettings(trainer_service_account=account), cluster=cluster, metrics=Metrics(),
                   workdir=tmp_path)


def test_built_objects_grant_exactly_what_the_trainer_needs() -> None:
    sa, role, binding = build_trainer_access("ml", "tailor-trainer")
    assert [o["kind"] for o in (sa, role, binding)] == ["ServiceAccount", "Role", "RoleBinding"]
    for obj in (sa, role, binding):
        assert obj["metadata"]["namespace"] == "ml" and obj["metadata"]["name"] == "tailor-trainer"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tailor"
    # tailor_trainer.report patches <run>-progress and creates it when missing; the validation pod
    # patches its ConfigMap: get/create/update/patch and nothing more (no list, no delete).
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "verbs": ["get", "create", "update", "patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tailor-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tailor-trainer", "namespace": "ml"}]


def test_chart_grants_the_same_rules_to_the_trainer() -> None:
    """The chart's own trainer Role (trainer.serviceAccount.namespaces) and the operator's agree."""
    text = (ROOT / "charts/tailor/templates/trainer-rbac.yaml").read_text()
    assert "resources: [configmaps]\n    verbs: [get, create, update, patch]" in text
    assert TRAINER_RULES[0]["verbs"] == ["get", "create", "update", "patch"]


def test_missing_objects_are_created_in_order(tmp_path: Path) -> None:
    api = MemoryApi()
    created, error = _context(api, tmp_path).ensure_trainer_access("ml")
    assert (created, error) == (["ServiceAccount", "Role", "RoleBinding"], None)
    for obj in build_trainer_access("ml", "tailor-trainer"):
        assert api.objects[api.path_of(obj["kind"], "ml", "tailor-trainer")] == obj
    api.calls.clear()
    assert _context(api, tmp_path).ensure_trainer_access("ml") == ([], None)
    assert {m for m, _ in api.calls} == {"GET"}  # present: only looked at


def test_existing_objects_of_someone_else_are_left_alone(tmp_path: Path) -> None:
    api = MemoryApi()
    theirs = {"apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": {"name": "tailor-trainer", "namespace": "ml",
                           "labels": {"app.kubernetes.io/managed-by": "Helm"}}}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "tailor-trainer", "namespace": "ml"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]}]}
    api.objects[api.path_of("ServiceAccount", "ml", "tailor-trainer")] = theirs
    api.objects[api.path_of("Role", "ml", "tailor-trainer")] = role
    created, error = _context(api, tmp_path).ensure_trainer_access("ml")
    assert (created, error) == (["RoleBinding"], None)
    assert api.objects[api.path_of("ServiceAccount", "ml", "tailor-trainer")] is theirs
    assert api.objects[api.path_of("Role", "ml", "tailor-trainer")]["rules"][0]["verbs"] == ["*"]


@pytest.mark.parametrize("plural,kind,named", [
    ("serviceaccounts", "ServiceAccount", 'get and create on serviceaccounts (API group "")'),
    ("roles", "Role", 'get and create on roles (API group "rbac.authorization.k8s.io")'),
    ("rolebindings", "RoleBinding", 'get and create on rolebindings (API group "rbac.authorization.k8s.io")'),
])
def test_refused_creation_names_the_missing_permission(tmp_path: Path, plural: str, kind: str, named: str) -> None:
    api = MemoryApi(forbidden=(plural,))
    created, error = _context(api, tmp_path).ensure_trainer_access("ml")
    assert error is not None
    assert f'cannot create {kind} "tailor-trainer" in namespace ml' in error and named in error
    assert "cannot create resource" in error  # the API server's own words follow
    order = ["ServiceAccount", "Role", "RoleBinding"]
    assert created == order[:order.index(kind)]  # stops at the first refusal


def test_no_trainer_account_configured_means_nothing_to_do(tmp_path: Path) -> None:
    api = MemoryApi()
    assert _context(api, tmp_path, account=None).ensure_trainer_access("ml") == ([], None)
    assert api.calls == []
