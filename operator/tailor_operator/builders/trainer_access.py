"""Pure: the trainer's ServiceAccount, Role and RoleBinding in one namespace.

Trainer and validation pods run as `TAILOR_TRAINER_SERVICE_ACCOUNT`; they write their progress and
result into ConfigMaps (tailor_trainer.report patches `<run>-progress` and creates it if missing;
the validation pod patches its `status.json`). The operator creates these three objects in a
namespace that lacks them, before the first validation Job or RayJob there, and never changes or
deletes existing ones (the chart's `trainer.serviceAccount.namespaces`, or a GitOps repository,
may own them instead). They are not owned by any one FineTuneJob or Dataset: they stay with the
namespace.
"""

from __future__ import annotations

from typing import Any

from tailor_operator.builders.labels import LABEL_COMPONENT, LABEL_NAME, MANAGED_BY, MANAGER

RBAC_GROUP = "rbac.authorization.k8s.io"
TRAINER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update", "patch"]},
]
# kind -> (API group, resource): what the operator needs `get` and `create` on to make them.
RESOURCES = {"ServiceAccount": ("", "serviceaccounts"), "Role": (RBAC_GROUP, "roles"),
             "RoleBinding": (RBAC_GROUP, "rolebindings")}
ACCESS_FAILED = "TrainerAccessFailed"
"""Condition/event reason when the operator cannot create them."""


def trainer_access_labels() -> dict[str, str]:
    return {MANAGED_BY: MANAGER, LABEL_NAME: "tailor-trainer", LABEL_COMPONENT: "trainer"}


def build_trainer_access(namespace: str, service_account: str) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding `service_account` in `namespace`, in creation order."""

    def meta() -> dict[str, Any]:
        return {"name": service_account, "namespace": namespace, "labels": trainer_access_labels()}

    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta()},
        {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "Role", "metadata": meta(),
         "rules": [dict(rule) for rule in TRAINER_RULES]},
        {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "RoleBinding", "metadata": meta(),
         "roleRef": {"apiGroup": RBAC_GROUP, "kind": "Role", "name": service_account},
         "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]},
    ]


def access_failure_message(obj: dict[str, Any], status: int, detail: str) -> str:
    """What a person must fix, naming the permission, e.g. get/create on serviceaccounts."""
    kind = obj["kind"]
    group, resource = RESOURCES[kind]
    meta = obj["metadata"]
    where = f'{kind} "{meta["name"]}" in namespace {meta["namespace"]}'
    if status != 403:
        return f"cannot ensure {where} for the trainer pods (HTTP {status}): {detail}"
    needs = f'the operator needs RBAC verbs get and create on {resource} (API group "{group}")'
    if kind in ("Role", "RoleBinding"):
        needs += (" and must itself hold what the Role grants (configmaps get, create, update, patch): "
                  "the API server lets no one grant rights it lacks")
    return f"cannot create {where}, which trainer pods run as: {needs}. API server: {detail}"
