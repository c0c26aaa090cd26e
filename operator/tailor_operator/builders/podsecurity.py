"""Pure: the securityContexts every trainer pod carries, so that namespaces enforcing the
`restricted` Pod Security Standard admit them (Ray head, Ray workers, the KubeRay submitter pod and
the Dataset validation Job pod).

The trainer image runs as the numeric user 1000; fsGroup 1000 makes mounted PVCs writable for it.
KubeRay copies the ray container's securityContext into the `wait-gcs-ready` init container it
injects into worker pods, so those pass too.
"""

from __future__ import annotations

from typing import Any

TRAINER_UID = 1000
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
