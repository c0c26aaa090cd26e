"""Pure: the NetworkPolicy that fences one run's Ray pods.

Ray's head listens on 0.0.0.0 (GCS 6379, dashboard and job API 8265, client 10001, object
manager and worker ports) with no authentication in the pinned Ray/KubeRay (token auth needs
KubeRay >= 1.5.1's `authOptions`): without a policy any pod in the cluster could submit code to
a run that holds the namespace's credentials and GPUs (the CVE-2023-48022 class). The policy
selects every pod of the run (head, workers, submitter: label `tailor.dev/run`) and admits
ingress only from pods of the same run, plus the installation's extra rules (by default the
KubeRay operator, which polls the dashboard's job API on 8265). Egress is left alone (the
trainer reads S3/HF/PVC sources and writes ConfigMaps through the API server).

A NetworkPolicy is only enforced by a CNI plugin that implements it (Calico, Cilium, ...).
"""

from __future__ import annotations

import copy
from typing import Any

from tailor_operator.api.v1alpha1 import FineTuneJob
from tailor_operator.builders.labels import LABEL_RUN, object_meta, run_labels

DASHBOARD_PORT = 8265
# The KubeRay operator (any namespace; its chart labels the pod app.kubernetes.io/name=kuberay-operator)
# reaches the head's job API to follow the Ray job.
DEFAULT_INGRESS: tuple[dict[str, Any], ...] = (
    {"from": [{"namespaceSelector": {},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
     "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
)


def build_run_network_policy(job: FineTuneJob, run: str,
                             extra_ingress: tuple[dict[str, Any], ...] = DEFAULT_INGRESS) -> dict[str, Any]:
    """networking.k8s.io/v1 NetworkPolicy `<run>` in the job's namespace, owned by the job."""
    labels = run_labels(job.metadata.name, run)
    run_pods = {"podSelector": {"matchLabels": {LABEL_RUN: run}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(run, job.metadata.namespace, labels, job),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_RUN: run}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [run_pods]}] + [copy.deepcopy(r) for r in extra_ingress],
        },
    }
