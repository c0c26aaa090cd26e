"""Labels, annotations and owner references every child object carries (pure)."""

from __future__ import annotations

from typing import Any, Optional

from tailor_operator.api.v1alpha1 import API_VERSION

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "tailor"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_JOB = "tailor.dev/finetunejob"
LABEL_RUN = "tailor.dev/run"
LABEL_DATASET = "tailor.dev/dataset"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"

ANNOTATION_ATTEMPT = "tailor.dev/attempt"
ANNOTATION_RUN_NUMBER = "tailor.dev/run-number"
ANNOTATION_REVISION = "tailor.dev/dataset-revision"
ANNOTATION_GENERATION = "tailor.dev/generation"
ANNOTATION_CONFIG_HASH = "tailor.dev/config-hash"
ANNOTATION_CONFIG = "tailor.dev/config"
"""On a RayJob's head and worker pod templates: the run's config.json, mounted from there through
the downward API (builders/rayjob.py)."""
ANNOTATION_BACKEND = "tailor.dev/backend"
"""On a Dataset: where its validation runs (kuberay or local); the operator's setting otherwise."""


def run_labels(job: str, run: str) -> dict[str, str]:
    """The labels of every object that belongs to one run."""
    return {MANAGED_BY: MANAGER, LABEL_JOB: job, LABEL_RUN: run}


def dataset_labels(dataset: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, LABEL_DATASET: dataset}


def owner_reference(obj: Any) -> dict[str, Any]:
    """A controller ownerReference to a Tailor object (FineTuneJob or Dataset model): the garbage
    collector removes the children if the operator cannot."""
    return {
        "apiVersion": API_VERSION,
        "kind": obj.kind,
        "name": obj.metadata.name,
        "uid": obj.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(name: str, namespace: Optional[str], labels: dict[str, str], owner: Any,
                annotations: Optional[dict[str, str]] = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    meta["ownerReferences"] = [owner_reference(owner)]
    return meta
