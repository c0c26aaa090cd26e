"""Pure: validate a Dataset revision on CPU with the trainer image (batch/v1 Job + ConfigMap).

The ConfigMap `<key>` holds the input (`dataset.json`, a ResolvedDataset) and a stdlib-only
`publish.py`; the pod runs `python -m tailor_trainer inspect` and publishes the status JSON it
wrote into the same ConfigMap under `status.json`, which is where the operator reads the result.
A Dataset that is not Ready is a result, not a pod failure: the pod exits 0 once it published.
The pod carries the restricted-PSS securityContexts of `builders/podsecurity.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from tailor_operator.api.v1alpha1 import Dataset
from tailor_operator.builders.labels import ANNOTATION_REVISION, LABEL_NAME, dataset_labels, object_meta
from tailor_operator.builders.naming import safe_name
from tailor_operator.builders.podsecurity import container_security_context, pod_security_context
from tailor_operator.builders.rayjob import PVC_ROOT, cpu_pool_placement, pvc_claim
from tailor_trainer.config import ResolvedDataset

INPUT_KEY = "dataset.json"
RESULT_KEY = "status.json"
PUBLISH_KEY = "publish.py"
MOUNT = "/etc/tailor"

# Runs in the trainer image with nothing but the standard library and the pod's ServiceAccount.
PUBLISH_SCRIPT = '''\
"""Write a file into key status.json of a ConfigMap in this pod's namespace (in-cluster API)."""
import json, os, ssl, sys, urllib.request
SA = "/var/run/secrets/kubernetes.io/serviceaccount"
name, path = sys.argv[1], sys.argv[2]
namespace = open(f"{SA}/namespace").read().strip()
token = open(f"{SA}/token").read().strip()
host = os.environ["KUBERNETES_SERVICE_HOST"]
host = f"[{host}]" if ":" in host else host
port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
body = json.dumps({"data": {"status.json": open(path).read()}}).encode()
request = urllib.request.Request(
    f"https://{host}:{port}/api/v1/namespaces/{namespace}/configmaps/{name}", data=body, method="PATCH",
    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"})
urllib.request.urlopen(request, context=ssl.create_default_context(cafile=f"{SA}/ca.crt"), timeout=30)
'''

COMMAND = (
    f"python -m tailor_trainer inspect --dataset {MOUNT}/{INPUT_KEY} --output json "
    "--result-file /tmp/status.json; rc=$?; "
    f'if [ -s /tmp/status.json ]; then python {MOUNT}/{PUBLISH_KEY} "$TAILOR_RESULT_CONFIGMAP" '
    "/tmp/status.json && exit 0; fi; exit $rc"
)


@dataclass(frozen=True)
class InspectJobOptions:
    image: str = "ghcr.io/tailor-dev/tailor-trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_account: Optional[str] = None
    ttl_seconds: int = 600
    cpu: str = "1"
    memory: str = "2Gi"
    deadline_seconds: int = 3600
    cpu_pool_node_selector: Optional[dict[str, str]] = None
    cpu_pool_tolerations: Optional[list[dict[str, Any]]] = None
    allow_private_addresses: bool = False
    """Installation policy: http(s) sources may reach loopback/link-local/metadata addresses."""


def render_dataset(resolved: ResolvedDataset) -> str:
    return json.dumps(resolved.model_dump(by_alias=True, mode="json", exclude_none=True),
                      indent=2, sort_keys=True)


def build_inspect_config_map(dataset: Dataset, key: str, resolved: ResolvedDataset) -> dict[str, Any]:
    labels = {**dataset_labels(dataset.metadata.name), LABEL_NAME: "tailor-inspect"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(key, dataset.metadata.namespace, labels, dataset,
                                {ANNOTATION_REVISION: resolved.revision} if resolved.revision else None),
        "data": {INPUT_KEY: render_dataset(resolved), PUBLISH_KEY: PUBLISH_SCRIPT},
    }


def build_inspect_job(dataset: Dataset, key: str, options: InspectJobOptions) -> dict[str, Any]:
    """The batch/v1 Job `<key>` that validates the data in ConfigMap `<key>`."""
    labels = {**dataset_labels(dataset.metadata.name), LABEL_NAME: "tailor-inspect"}
    source = dataset.spec.source
    secrets = [source.secret_ref.name] if source.secret_ref else []
    return build_cpu_check_job(key, dataset.metadata.namespace, labels, dataset, "inspect", COMMAND, options,
                               secrets=secrets, claims=[c for c in (pvc_claim(source.uri),) if c])


def build_cpu_check_job(key: str, namespace: Optional[str], labels: dict[str, str], owner: Any, container_name: str,
                        command: str, options: InspectJobOptions, *, image: Optional[str] = None,
                        secrets: Sequence[str] = (), claims: Sequence[str] = ()) -> dict[str, Any]:
    """A CPU check in the trainer image before anything big starts (a Dataset's validation, a job's
    model preflight): batch/v1 Job `<key>` whose pod reads ConfigMap `<key>` at /etc/tailor and
    publishes its result into it. Secrets arrive as environment only, never as files a URI could
    name (docs/security.md); PVCs read-only."""
    volumes: list[dict[str, Any]] = [{"name": "input", "configMap": {"name": key}}]
    mounts: list[dict[str, Any]] = [{"name": "input", "mountPath": MOUNT, "readOnly": True}]
    container: dict[str, Any] = {
        "name": container_name,
        "image": image or options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["sh", "-c", command],
        "env": [{"name": "TAILOR_RESULT_CONFIGMAP", "value": key}],
    }
    if options.allow_private_addresses:
        container["env"].append({"name": "TAILOR_ALLOW_PRIVATE_ADDRESSES", "value": "1"})
    if secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in dict.fromkeys(secrets)]
    for claim in dict.fromkeys(claims):
        volumes.append({"name": safe_name("pvc-", claim), "persistentVolumeClaim": {"claimName": claim,
                                                                                      "readOnly": True}})
        mounts.append({"name": safe_name("pvc-", claim), "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    container["resources"] = {"requests": {"cpu": options.cpu, "memory": options.memory},
                              "limits": {"cpu": options.cpu, "memory": options.memory}}
    container["securityContext"] = container_security_context()
    container["volumeMounts"] = mounts
    pod: dict[str, Any] = {"restartPolicy": "Never"}
    if options.service_account:
        pod["serviceAccountName"] = options.service_account
    pod["securityContext"] = pod_security_context()
    cpu_pool_placement(pod, options.cpu_pool_node_selector, options.cpu_pool_tolerations)
    pod["containers"] = [container]
    pod["volumes"] = volumes
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(key, namespace, labels, owner),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": options.deadline_seconds,
            "ttlSecondsAfterFinished": options.ttl_seconds,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
